"""The compressor interface: what goes on the wire, and how payloads of many ranks meet.

A compressor turns a dense tensor into a `Payload` (the tensors sent, plus what
is needed to rebuild a dense tensor locally) and back. Two kinds exist:

- linear compressors (FP16, BF16, RandomK with a seed shared by the ranks):
  the sum of payloads decompresses to the sum of the tensors, so payloads are
  all-reduced like dense gradients;
- the others (TopK, Threshold, DGC, QSGD, SignSGD): every rank's payload is
  all-gathered and each is decompressed and added up.

What a compressor declares, and what `gk.Average` and the DDP hook read from it,
is the contract on `Compressor` below: trait flags (class attributes), the keyed
``compress(tensor, key=..., commit=...)`` with `commit`/`discard`, and the
optional `start_reduce` hook. A new compressor is one subclass; a stateful one
keeps its deferred state in a `Deferred`.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
from torch import Tensor

from gradkit import _checks
from gradkit._stateful import Stateful
from gradkit.compression.keyed_state import check_sizes

if TYPE_CHECKING:
    import torch.distributed as dist

    from gradkit.compression.keyed_state import Layout
    from gradkit.distributed import PendingReduce

__all__ = ["Compressor", "Deferred", "Payload", "check_density", "check_value_dtype", "drain", "narrow"]

_Entry = TypeVar("_Entry")


@dataclass
class Payload:
    """A compressed tensor.

    Attributes:
        tensors: what is sent to other ranks.
        shape, dtype: of the dense tensor it stands for.
        owner: the compressor that made it (decompressing with another one is an error).
        meta: local, non-wire facts needed to decompress (e.g. a random seed).
    """

    tensors: list[Tensor]
    shape: torch.Size
    dtype: torch.dtype
    owner: Compressor
    meta: dict[str, Any] = field(default_factory=dict)
    #: bytes on the wire when `tensors` are not what was sent (PowerSGD sends factors, keeps the product)
    wire_nbytes: int | None = None

    @property
    def nbytes(self) -> int:
        """Bytes on the wire."""
        if self.wire_nbytes is not None:
            return self.wire_nbytes
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


class Compressor(Stateful):
    """Base of every compressor: ``compress(tensor) -> Payload``, ``decompress(payload) -> tensor``.

    The contract, declared here and read by `gk.Average`, `gk.ddp_comm_hook` and
    `averaging.payloads.start_reduce` (never probed with ``getattr``):

    - trait flags, class attributes a subclass sets when they hold (`linear`,
      `biased`, `sparse`, `variable_size`, `keyed`, `keeps_residual`): they pick
      how payloads meet across ranks and whether error feedback is added;
    - keyed compressors (``keyed = True``) take ``compress(tensor, key=..., commit=...)``:
      `key` names the parameter (or a bucket `Layout`) the state belongs to, and
      with ``commit=False`` the new state waits in a `Deferred` until `commit()`
      (the step was taken) or `discard()` (it was skipped);
    - `start_reduce`, optional: a compressor whose communication is not one
      payload per rank (PowerSGD's two rounds) sets it to a method with the
      signature of `averaging.payloads.start_reduce` (without the compressor and `out`;
      with `carries_flags`, also the keywords of `PowerSGD.start_reduce`);
    - state saved by parameter name is listed by `named_state`, so that a
      checkpoint taken under other names is refused (`check_state_names`).

    Example:
        >>> class Halve(Compressor):
        ...     linear = True
        ...     def compress(self, tensor):
        ...         return Payload([self._check_input(tensor) / 2], tensor.shape, tensor.dtype, self)
        ...     def decompress(self, payload):
        ...         return self._check_payload(payload).tensors[0] * 2
    """

    #: payloads add up: ``decompress(sum of payloads) == sum of decompress(payload)``
    linear: bool = False
    #: E[decompress(compress(x))] != x: `gk.Average` wraps it in error feedback by default
    biased: bool = False
    #: payloads are (indices, values): many ranks' payloads decompress in one scatter
    sparse: bool = False
    #: payload sizes differ between ranks (all-gather needs a size exchange first)
    variable_size: bool = False
    #: keeps per-parameter state: ``compress(tensor, key=..., commit=...)``, then commit()/discard()
    keyed: bool = False
    #: keeps its own memory of what was not sent (DGC's velocity, PowerSGD's residual):
    #: `gk.Average` adds no error feedback even when it is biased
    keeps_residual: bool = False
    #: its `start_reduce` also takes ``out=``, ``bad=`` and ``absent=`` (see `PowerSGD.start_reduce`) and
    #: carries the non-finite flag and which parameters this rank lacks in its own collectives:
    #: `gk.Average` then sends no flag all-reduce
    carries_flags: bool = False
    #: optional hook: ``start_reduce(flat, layout, group, weight, what, timeout) -> PendingReduce``
    #: replaces compress, weight and all-reduce/all-gather (None: the generic path)
    start_reduce: (
        Callable[
            [Tensor, Layout, dist.ProcessGroup | None, Tensor | float, str, datetime.timedelta | None], PendingReduce
        ]
        | None
    ) = None
    #: the state of ``compress(..., commit=False)`` calls, for commit()/discard() (keyed compressors)
    _deferred: Deferred[Any] | None = None

    def compress(self, tensor: Tensor) -> Payload:
        raise NotImplementedError

    def decompress(self, payload: Payload) -> Tensor:
        raise NotImplementedError

    def residual_(self, corrected: Tensor, payload: Payload) -> Tensor:
        """Turn `corrected` in place into ``corrected - decompress(payload)`` (what was not sent)."""
        return corrected.sub_(self.decompress(payload).view_as(corrected))

    def compress_sum_(self, into: Tensor, addend: Tensor, scale: Tensor) -> Payload:
        """Add ``addend * scale`` into `into` in place, zero `addend`, and compress the new `into`.

        Error feedback's one-process step: the gradient (`addend`) moves into the residual
        (`into`), which is compressed where it lies; the sent values then move back into the
        zeroed gradient. Non-finite entries of `addend` count as 0 (the caller flags such a
        step), so that ``scale == 0`` leaves `into` exactly as it was. A compressor may fuse
        these passes (`TopK` does, on a CPU); the result is that of ``compress(into)``.

        Args:
            into: a 1-d tensor (the residual); addend: one of its size, dtype and device.
            scale: a 0-d tensor in their dtype.

        Returns:
            The payload of the new `into`.
        """
        into.addcmul_(addend.nan_to_num_(0.0, 0.0, 0.0), scale)
        addend.zero_()
        return self.compress(into)

    def under_error_feedback(self) -> Compressor:
        """The compressor `ErrorFeedback` uses in this one's place: itself, unless it sends differently when a
        residual holds what it does not send (`FP16` and `BF16` then saturate instead of overflowing)."""
        return self

    def compress_residual_(self, tensor: Tensor, *, sum_of: tuple[Tensor, Tensor] | None = None) -> Payload:
        """Compress `tensor` and leave in it, in place, what was not sent (error feedback's residual).

        Equals ``payload = compress(tensor)`` then ``residual_(tensor, payload)``, which is what this
        default does; a compressor may fuse the two (`TopK` does, on a CPU: the sent entries are
        taken out while the pass that finds them has them in cache).

        Args:
            tensor: a contiguous floating tensor, changed in place.
            sum_of: two tensors of tensor's size whose sum is written into `tensor` first (its
                old values are not read; either may be `tensor` itself), so that forming the
                sum joins the same pass.

        Returns:
            The payload of `tensor` as it was (after the sum, if any).
        """
        if sum_of is not None:
            torch.add(sum_of[0].view_as(tensor), sum_of[1].view_as(tensor), out=tensor)
        payload = self.compress(tensor)
        self.residual_(tensor, payload)
        return payload

    def absorb_sum_(
        self, into: Tensor, addend: Tensor, scale: Tensor, keep: Tensor, *, write_back: Tensor | None = None
    ) -> Payload:
        """`compress_sum_`, then `into` keeps what was not sent; where `keep` is False nothing is sent.

        Error feedback's whole one-process step on a residual `into`: ``into += addend * scale``,
        ``addend`` zeroed, the new `into` compressed, its sent part taken out of it. With `keep`
        False (a skipped step; the caller passes ``scale == 0``) the payload's values are zeros
        and `into` is left as it was. This default is `compress_sum_`, a multiply and
        `residual_`; `TopK` does it in one pass on a CPU.

        Args:
            into: a 1-d tensor (the residual); addend: one of its size, dtype and device.
            scale: a 0-d tensor in their dtype; keep: a 0-d bool tensor (no host read).
            write_back: a 0-d tensor in their dtype, or None: what is sent, times it, is written
                into the zeroed `addend` (the one-process step's selective update; `TopK` writes
                it in the selecting pass, while each chunk is in cache).

        Returns:
            The payload of the new `into`, its values times `keep`.
        """
        payload = self.compress_sum_(into, addend, scale)
        for part in payload.tensors:
            if part.is_floating_point():
                part.mul_(keep)  # a refused step sends nothing, so the residual keeps it all
        self.residual_(into, payload)
        if write_back is not None:
            self.add_sent_(addend, payload, write_back)
        return payload

    def absorb_into_(
        self, tensor: Tensor, residual: Tensor, scale: Tensor, keep: Tensor, *, write_back: Tensor | None = None
    ) -> Payload:
        """`absorb_sum_` for a residual of another dtype (e.g. bfloat16): the sum is formed in `tensor`.

        ``tensor * scale + residual`` is formed in `tensor`, in its dtype, and compressed; what
        was not sent is stored into `residual` (rounded to its dtype), and `tensor` is left
        zeroed, or holding what is sent times `write_back`. With `keep` False (the caller passes
        ``scale == 0``) nothing is sent, `residual` is left as it was, and non-finite entries of
        `tensor` count as 0. This default takes several passes; `TopK` does it in one on a CPU.

        Args:
            tensor: a contiguous 1-d floating tensor (the gradient), consumed.
            residual: a 1-d tensor of its size and device, updated in place.
            scale: a 0-d tensor in tensor's dtype; keep: a 0-d bool tensor.
            write_back: a 0-d tensor in tensor's dtype, or None (see `absorb_sum_`).

        Returns:
            The payload of ``tensor * scale + residual``, its values times `keep`.
        """
        target = tensor.nan_to_num_(0.0, 0.0, 0.0).mul_(scale).add_(residual)
        payload = self.compress(target)
        for part in payload.tensors:
            if part.is_floating_point():
                part.mul_(keep)  # a refused step sends nothing, so the residual keeps it all
        self.residual_(target, payload)
        residual.copy_(target)
        tensor.zero_()
        if write_back is not None:
            self.add_sent_(tensor, payload, write_back)
        return payload

    def add_sent_(self, tensor: Tensor, payload: Payload, factor: Tensor | None = None) -> Tensor:
        """Add what `payload` sends (times `factor`, if given) into `tensor`, in place.

        Sparse payloads are scattered (padding adds 0), others decompressed.

        Args:
            tensor: a tensor of the payload's size; factor: a 0-d tensor, or None for 1.

        Returns:
            `tensor`.
        """
        if self.sparse:
            indices, values = payload.tensors
            values = values.to(tensor.dtype) if factor is None else values.to(tensor.dtype) * factor
            tensor.view(-1).index_add_(0, indices.long(), values)
            return tensor
        sent = self.decompress(payload).view_as(tensor)
        return tensor.add_(sent if factor is None else sent * factor)

    def payload_for(self, tensors: list[Tensor], like: Payload) -> Payload:
        """A payload with other wire tensors (e.g. the sum over ranks) and `like`'s local facts."""
        return Payload(tensors, like.shape, like.dtype, like.owner, dict(like.meta))

    def commit(self) -> None:
        """Keep the state of deferred compress calls (stateless compressors: nothing)."""
        if self._deferred is not None:
            self._deferred.commit()

    def discard(self) -> None:
        """Forget the state of deferred compress calls (stateless compressors: nothing)."""
        if self._deferred is not None:
            self._deferred.discard()

    def named_state(self, state: object) -> list[tuple[str, Mapping[str, Any], bool]]:
        """The parts of a saved `state` (from `state_dict()`) that are kept by parameter name.

        Returns:
            ``(field, {name: value}, complete)`` triples; `complete` fields hold every
            compressed parameter once they hold any (a residual per parameter), the others
            some (PowerSGD keeps Q for matrices only). Parts of a malformed state are left
            out: `load_state_dict` names what is wrong with it. Stateless compressors: none.
        """
        return []

    def check_state_names(
        self,
        owner: str,
        state: object,
        known: Collection[str],
        required: Collection[str] = (),
        numels: Mapping[str, int] | None = None,
    ) -> None:
        """Refuse a saved `state` whose per-parameter entries are kept under other names.

        Args:
            owner: who loads it, for the message (e.g. "Average").
            state: what `state_dict()` returned.
            known: the names of every parameter here.
            required: the names a complete field must hold once it holds any (those
                compressed at every step); empty: only unknown names are refused.
            numels: entries per parameter name; a complete field's tensor (a residual, a
                momentum) of another size is refused. None: sizes are not checked.

        Raises:
            ValueError: naming the first unknown or missing name, before anything is loaded.
        """
        known = set(known)
        parts = self.named_state(state)
        # Unknown names first, in every part: a renamed model shows as unknown (and missing) names.
        for part, by_name, _ in parts:
            unknown = [name for name in by_name if name not in known]
            if unknown:
                raise ValueError(
                    f"{owner}.load_state_dict: the compressor state holds {part!r} for parameter {unknown[0]!r}, "
                    f"which this model does not have (it has {_some(sorted(known))}); "
                    "load the state into a model whose parameters have the names it was saved with "
                    "(a model wrapped in another module, e.g. nn.Sequential, prefixes every name; "
                    "DDP's 'module.' and torch.compile's '_orig_mod.' are dropped)"
                )
        for part, by_name, complete in parts:
            missing = [name for name in required if name not in by_name] if complete and by_name else []
            if missing:
                raise ValueError(
                    f"{owner}.load_state_dict: the compressor state holds no {part!r} for parameter {missing[0]!r} "
                    f"(it holds {_some(list(by_name))}); load the state saved from this model, with the same "
                    "parameters under the same names"
                )
        if numels is not None:  # complete fields hold one entry per parameter entry
            where = f"{owner}.load_state_dict: "
            kept = [
                (part, {n: v.numel() for n, v in by_name.items() if isinstance(v, Tensor)})
                for part, by_name, complete in parts
                if complete
            ]
            check_sizes(kept, numels, where)

    # -- checks shared by every compressor --

    def _check_input(self, tensor: object) -> Tensor:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{type(self).__name__}.compress expects a tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(
                f"{type(self).__name__}.compress expects a floating-point tensor, got {tensor.dtype}; "
                "gradients of integer tensors cannot be compressed"
            )
        return tensor

    def _check_payload(self, payload: object) -> Payload:
        if not isinstance(payload, Payload):
            raise TypeError(
                f"{type(self).__name__}.decompress expects a Payload from compress(), got {type(payload).__name__}"
            )
        if payload.owner is not self and type(payload.owner) is not type(self):
            raise ValueError(
                f"{type(self).__name__}.decompress got a payload made by {type(payload.owner).__name__}; "
                "decompress with the compressor that compressed it"
            )
        if payload.owner is not self:
            # Another instance of the same class: its payload decodes here only with the same settings.
            theirs, mine = payload.owner.decoding(), self.decoding()
            for name in mine:
                if theirs.get(name) != mine[name]:
                    kind = type(self).__name__
                    raise ValueError(
                        f"{kind}.decompress got a payload made with {name}={theirs.get(name)!r}, but this {kind} has "
                        f"{name}={mine[name]!r}; pass it to the compressor that compressed it, or build this one "
                        f"with {name}={theirs.get(name)!r}"
                    )
        return payload

    def decoding(self) -> dict[str, Any]:
        """The settings `decompress` reads besides the payload (e.g. QSGD's levels); a payload made
        by another instance decompresses only if they are equal. Default: none."""
        return {}


def _some(names: list[str], shown: int = 5) -> str:
    listed = ", ".join(repr(name) for name in names[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "") if names else "none"


class Deferred(Generic[_Entry]):
    """State changes computed now and applied later: by `commit()`, or dropped by `discard()`.

    Keyed compressors compress a bucket during backward, before the pipeline knows
    whether the step will be taken; their new state (residuals, momentum, Q) waits
    here. Each entry is applied with ``apply(*entry)``, oldest first.

    Args:
        apply: takes an entry's fields and makes them the compressor's state.

    Example:
        >>> deferred = Deferred(lambda state, new: state.copy_(new))
        >>> deferred.add(state, new, now=False)   # kept aside
        >>> deferred.commit()                     # state now holds new
    """

    def __init__(self, apply: Callable[..., None]) -> None:
        self._apply = apply
        self._pending: list[_Entry] = []

    def add(self, *entry: Any, now: bool = False) -> None:
        """Apply `entry` now (``now=True``: this entry only, others still wait) or keep it for `commit()`."""
        if now:
            self._apply(*entry)
        else:
            self._pending.append(entry)  # type: ignore[arg-type]

    def commit(self) -> None:
        """Apply every waiting entry, oldest first; safe from several threads (DDP's hook futures)."""
        for entry in drain(self._pending):
            self._apply(*entry)  # type: ignore[misc]

    def discard(self) -> None:
        """Drop every waiting entry."""
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._pending)


def check_density(density: object) -> float:
    """`density` as a float in (0, 1]."""
    return _checks.number_in_range("density", density, 0.0, 1.0, "pass the fraction of entries to keep, e.g. 0.01")


def narrow(values: Tensor, dtype: torch.dtype | None, *, copy: bool = False) -> Tensor:
    """`values` in `dtype` (None: as they are), saturated at the largest finite magnitude of `dtype`.

    A plain cast sends an entry beyond that range (65504 in float16) as inf: error feedback then keeps
    -inf, and NaN from the next step on, in that entry's residual for good. Saturated, the entry is sent
    as the largest magnitude and the excess stays in the residual. NaN and inf stay as they are (a
    non-finite gradient is for the caller to see: the pipeline refuses its step, a GradScaler backs off).
    `copy`: never return `values` itself (a payload must not alias its input). For the sparsifiers' values
    only: `FP16` and `BF16` cast, so that an overflow skips the step (nothing else holds the excess there).

    Example:
        >>> narrow(torch.tensor([1e5, -3.0]), torch.float16)
        tensor([65504., -3.], dtype=torch.float16)
    """
    if dtype is None or dtype == values.dtype:
        return values.clone() if copy else values
    largest = torch.finfo(dtype).max
    if values.is_floating_point() and largest < torch.finfo(values.dtype).max:
        # Finite values only: an inf stays inf, so that an overflow upstream is still seen (a GradScaler backs off).
        values = torch.where(values.isinf(), values, values.clamp(-largest, largest))
    return values.to(dtype)


def check_value_dtype(value_dtype: object) -> torch.dtype | None:
    """`value_dtype` if it is a floating torch.dtype (the dtype of sent values) or None."""
    if value_dtype is not None and not (isinstance(value_dtype, torch.dtype) and value_dtype.is_floating_point):
        raise TypeError(
            f"value_dtype must be a floating torch.dtype such as torch.float16, or None; got {value_dtype!r}"
        )
    return value_dtype  # type: ignore[return-value]


def count_for(density: float, numel: int) -> int:
    """How many entries a density keeps of `numel` (at least one, none of an empty tensor)."""
    return min(numel, max(1, int(round(density * numel))))


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices where they fit: half the index bytes on the wire."""
    return torch.int32 if numel < 2**31 else torch.int64


def drain(pending: list[_Entry]) -> Iterator[_Entry]:
    """Pop `pending`'s entries oldest first until none is left.

    DDP completes a hook's futures on several threads, each of which commits: a
    check-then-pop could pop an entry another thread just took. `list.pop` is atomic.
    """
    while True:
        try:
            yield pending.pop(0)
        except IndexError:
            return
