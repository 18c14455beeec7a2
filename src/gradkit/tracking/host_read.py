"""Device values gathered under names and read to the host in one transfer that never stalls the step.

A logging step reads everything it writes at once: the per-parameter table, the step's scalars, the
noise sample. On a GPU host every torch call costs several microseconds of Python and launch time, so
the values are gathered with a fixed number of calls whatever their number: the 0-d values in one
``torch.stack``, the arrays and that stack in one ``torch.cat`` (both promote mixed dtypes), then one
non-blocking copy into pinned host memory and an event. Values that are already on the host (while the
read targets a device) are read where they are, gathered the same way, with no copy to the device.
`HostRead` hands the values back under the names they were added with, so no caller slices a flat list.

A read whose values are all in host memory already (a CPU run: `DIRECT_DEVICES`) copies none of them into
a gathered tensor: each is read where it is (a number, or a float64 numpy copy of an array), which costs a
few microseconds where the stack and the cat cost about 35 (a dozen values, one thread).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["HostRead", "InFlight", "READY", "device_event"]


_CPU = torch.device("cpu")

#: Device types whose reads take each value where it is, with no gathering op (host memory: nothing to wait for).
DIRECT_DEVICES: tuple[str, ...] = ("cpu",)
# The dtypes numpy reads without a cast of torch's (bfloat16 is not one of them).
_NUMPY_DTYPES = frozenset((torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16,
                           torch.int8, torch.uint8, torch.bool))  # fmt: skip


class _Gathered:
    """The values of one side of a read (on the read's device, or on the host): arrays as 1-D pieces
    (in the order added) and 0-d values (stacked together after them)."""

    __slots__ = ("arrays", "scalars")

    def __init__(self) -> None:
        self.arrays: list[tuple[str, tuple[int, ...], list[Tensor]]] = []
        self.scalars: list[tuple[str, tuple[int, ...], list[Tensor]]] = []

    def flat(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, dict[str, tuple[int, int]]]:
        """Every value in one new 1-D tensor (promoted: `dtype`, or a dtype `dtype` holds every value of
        exactly), and where each name's values start and how many they are."""
        slots, at, pieces = {}, 0, []
        for name, shape, parts in self.arrays:
            size = math.prod(shape)
            slots[name], at = (at, size), at + size
            pieces += parts
        if self.scalars:
            values = [t for _, _, parts in self.scalars for t in parts]
            for name, _, parts in self.scalars:
                slots[name], at = (at, len(parts)), at + len(parts)
            pieces.append(_joined(torch.stack, values, len(values), dtype, device))
        if not pieces:  # nothing on this side: an empty host tensor, nothing to wait for
            return torch.zeros(0, dtype=dtype), slots
        if len(pieces) == 1 and not self.arrays:  # the stack is a new tensor already
            return pieces[0], slots
        return _joined(torch.cat, pieces, at, dtype, device), slots

    def direct(self) -> dict[str, Any] | None:
        """Every value read where it is: a float for a 0-d value, a list of floats for a stack, a float64 numpy
        copy for an array (of its shape); None when some value is not a plain host tensor numpy reads as it is."""
        for _, _, parts in self.arrays + self.scalars:
            for t in parts:
                if type(t) is not Tensor or t.device.type != "cpu" or t.dtype not in _NUMPY_DTYPES or t.is_sparse:
                    return None
        got: dict[str, Any] = {}
        for name, shape, parts in self.arrays:
            # np.array copies: the read keeps the values of now, whatever later steps write to the tensors.
            flat = [t.detach().numpy().reshape(-1) for t in parts]
            got[name] = np.array(flat[0] if len(flat) == 1 else flat, dtype=np.float64).reshape(shape)
        for name, shape, parts in self.scalars:
            # Host memory: reading a 0-d value is no sync. float() gives what a float64 cast of it gives.
            values = [float(t.item()) for t in parts]
            got[name] = values if shape else values[0]
        return got


def _joined(op: Callable, tensors: list[Tensor], size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``op(tensors)`` (stack or cat: a new tensor), in a dtype that holds every value exactly for a later
    cast to `dtype`: promotion of floats and bools does; integers go straight into `dtype` (a float32 result
    would round counts above 2**24)."""
    dtypes = {t.dtype for t in tensors}
    floats = [d.is_floating_point for d in dtypes]
    if dtype in dtypes or (any(floats) and all(f or d == torch.bool for f, d in zip(floats, dtypes))):
        return op(tensors)
    return op(tensors, out=torch.empty(size, dtype=dtype, device=device))


class HostRead:
    """Device tensors gathered under names and read to the host in one transfer.

    Args:
        device, dtype: where and as what the values are gathered (``float64`` keeps
            element counts exact up to 2**53).

    Example:
        >>> read = HostRead(torch.device("cpu"), torch.float64)
        >>> read.add("table", torch.zeros(3, 5))
        >>> read.add("norm", torch.tensor(2.0))
        >>> got = read.read()              # one .tolist()
        >>> got["norm"], len(got["table"])
        (2.0, 3)
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self._order: list[str] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._there = _Gathered()  # on the read's device
        self._here = _Gathered()  # on the host while the read targets a device: no copy there, no wait

    def add(self, name: str, value: Tensor, *, scalar: bool = False) -> None:
        """Queue `value` (any shape; one element read as a number if `scalar`) to be read as `name`; no host sync."""
        if scalar and value.ndim:
            value = value.reshape(())
        side = self._side(name, (value,))
        shape = tuple(value.shape)
        self._shapes[name] = shape
        if not shape:
            side.scalars.append((name, shape, [self._moved(value, side)]))
        else:
            side.arrays.append((name, shape, [self._moved(value if len(shape) == 1 else value.reshape(-1), side)]))

    def add_rows(self, name: str, rows: Sequence[Tensor]) -> None:
        """Queue 1-D tensors of one length as the rows of one (len(rows), n) value `name` (no stack of them)."""
        side = self._side(name, rows)
        self._shapes[name] = (len(rows), rows[0].numel() if rows else 0)
        side.arrays.append((name, self._shapes[name], [self._moved(row, side) for row in rows]))

    def add_stack(self, name: str, values: Sequence[Tensor]) -> None:
        """Queue one-element tensors as one (len(values),) value `name`, read as a list of numbers."""
        values = [v if not v.ndim else v.reshape(()) for v in values]
        side = self._side(name, values)
        self._shapes[name] = (len(values),)
        side.scalars.append((name, self._shapes[name], [self._moved(v, side) for v in values]))

    def _side(self, name: str, values: Sequence[Tensor]) -> _Gathered:
        if name in self._shapes:
            raise ValueError(f"HostRead: {name!r} was added twice; give each value its own name")
        self._order.append(name)
        # Moving a host value to the device would copy from pageable memory and wait on the
        # stream; it is on the host already, so it is read from where it is.
        on_host = self.device.type != "cpu" and bool(values) and all(v.device.type == "cpu" for v in values)
        return self._here if on_host else self._there

    def _moved(self, value: Tensor, side: _Gathered) -> Tensor:
        """`value` where its side gathers: the host, or the read's device (a value elsewhere is copied there)."""
        where = _CPU if side is self._here else self.device
        device = value.device
        if device.type == where.type and (where.index is None or device.index == where.index):
            return value
        return value.to(where)

    def read(self) -> dict[str, Any]:
        """Every queued value by name, in one host transfer that waits for the device: a float
        for a 0-d tensor, (nested) lists of floats otherwise."""
        flight = self.start(lambda device: READY)
        flight.wait()
        return flight.values()

    def start(self, new_event: Callable[[torch.device], Any] | None = None) -> InFlight:
        """Start the transfer without waiting: a non-blocking copy into pinned host memory on CUDA
        (a plain one elsewhere), followed by an event; no host sync.

        Args:
            new_event: ``new_event(device)`` records and returns an object with ``query()``
                (done yet?) and ``synchronize()`` (wait); default `device_event`.

        Returns:
            The `InFlight` read: ``done()`` polls, ``wait()`` waits, ``values()`` decodes.
        """
        if (
            self.device.type in DIRECT_DEVICES and self.dtype == torch.float64 and not self._here.arrays
            and not self._here.scalars
        ):  # fmt: skip
            got = self._there.direct()
            if got is not None:
                return _Landed(got, self._order, (new_event or device_event)(self.device))
        # Under no_grad rather than a detach per value: gathering must not join an autograd graph.
        with torch.no_grad():
            flat, there = self._there.flat(self.dtype, self.device)
            here, hosted = None, {}
            if self._here.scalars or self._here.arrays:
                here, hosted = self._here.flat(self.dtype, _CPU)
                here = _as(here, self.dtype)
        if flat.device.type == "cuda":
            host = torch.empty(flat.shape, dtype=self.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)  # a non-blocking copy casts on the device, then copies
        elif flat.device.type == "cpu":
            host = _as(flat, self.dtype)  # stack or cat made it: a copy no later step writes to
        else:  # other accelerators: a plain (waiting) copy, so the values are there when the event says so
            host = flat.to("cpu", self.dtype)
        slots = {}
        for name in self._order:
            side, (at, size) = (0, there[name]) if name in there else (1, hosted[name])
            slots[name] = (side, at, size, self._shapes[name])
        return InFlight(host, here, slots, (new_event or device_event)(flat.device))


def _as(values: Tensor, dtype: torch.dtype) -> Tensor:
    """`values` in `dtype` (a promoted float32 or bfloat16 result: cast, as numpy reads no bfloat16)."""
    return values if values.dtype == dtype else values.to(dtype)


class _Ready:
    """An event that has already completed: values on the host are there at once."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


READY = _Ready()


def device_event(device: torch.device) -> Any:
    """An event recorded now on `device`'s current stream (CUDA), or one already complete (elsewhere)."""
    if device.type == "cuda":
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event
    return READY


class InFlight:
    """A started `HostRead`: the host memory the copy lands in (and the values read where they were on the
    host), where each name's values are, and the event after the copy.

    Example:
        >>> flight = read.start()
        >>> if flight.done():          # a poll, never a wait
        ...     got = flight.values()
    """

    __slots__ = ("host", "here", "slots", "event")

    def __init__(
        self, host: Tensor, here: Tensor | None, slots: dict[str, tuple[int, int, int, tuple[int, ...]]], event: Any
    ) -> None:
        self.host, self.here, self.slots, self.event = host, here, slots, event

    def done(self) -> bool:
        """Whether the copy has completed (polls the event; no wait)."""
        return bool(self.event.query())

    def wait(self) -> None:
        """Wait for the copy (close, flush, state_dict: off the step's path)."""
        self.event.synchronize()

    def values(self, arrays: tuple[str, ...] = ()) -> dict[str, Any]:
        """The values by name; only after `done()` or `wait()`.

        Args:
            arrays: names whose values come as float64 numpy arrays of their shape (views of the host
                memory where it is float64) instead of (nested) lists.
        """
        # Host memory (the copy has landed): numpy reads it without a copy.
        sources = (self.host.numpy(), self.here.numpy() if self.here is not None else None)
        got = {}
        for name, (side, at, size, shape) in self.slots.items():
            value = sources[side][at : at + size]
            if name in arrays:
                got[name] = np.asarray(value, dtype=np.float64).reshape(shape)
            else:
                got[name] = _nest(value.tolist(), shape)
        return got


_NOTHING = torch.zeros(0, dtype=torch.float64)  # a landed read's host buffer: its values are held by name


class _Landed(InFlight):
    """A read of host values taken where they were (`DIRECT_DEVICES`): the values themselves, by name."""

    __slots__ = ("got", "order")

    def __init__(self, got: dict[str, Any], order: list[str], event: Any) -> None:
        super().__init__(_NOTHING, None, {}, event)
        self.got, self.order = got, order

    def values(self, arrays: tuple[str, ...] = ()) -> dict[str, Any]:
        """As `InFlight.values`: the arrays named in `arrays` as float64 numpy arrays, the others as lists."""
        got = self.got
        return {
            name: got[name] if name in arrays or type(got[name]) is not np.ndarray else got[name].tolist()
            for name in self.order
        }


def _nest(values: list[float], shape: tuple[int, ...]) -> Any:
    if not shape:
        return values[0]
    if len(shape) == 1:
        return values
    inner = math.prod(shape[1:])
    return [_nest(values[i * inner : (i + 1) * inner], shape[1:]) for i in range(shape[0])]
