"""Process groups, rank checks and collectives that fail loudly.

gradkit talks to other processes only through `torch.distributed` (gloo on
CPU, NCCL on GPU). Every collective waits under a timeout (the process
group's, or one given to gradkit), and a failure is re-raised with the name of
the operation, so a dead or stuck peer is a clear error, never a silent hang.
"""

from __future__ import annotations

import collections
import datetime
import json
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "resolve_group",
    "world_size",
    "wait",
    "run",
    "all_gather_varying",
    "check_same_parameters",
    "broadcast_parameters",
    "CollectiveError",
    "PendingReduce",
]


class CollectiveError(RuntimeError):
    """A collective failed or timed out: a peer died, hung, or the network broke."""


def resolve_group(group: dist.ProcessGroup | None, owner: str) -> dist.ProcessGroup | None:
    """The group to use, or None for a group of one (torch.distributed not initialized).

    Raises:
        ValueError: `group` was given but torch.distributed is not initialized,
            or this rank is not a member of `group`.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError(
                f"{owner}: group={group!r} was given but torch.distributed is not initialized; call "
                "torch.distributed.init_process_group first (torchrun sets up the environment), or pass group=None"
            )
        return None
    group = group if group is not None else dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"{owner}: this process (global rank {dist.get_rank()}) is not a member of group={group!r}; "
            "pass a group created with dist.new_group that includes every rank that calls it"
        )
    return group


def check_group_type(group: object) -> None:
    """`group` must be a torch.distributed process group or None."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__} {group!r}; pass e.g. "
            "dist.new_group(ranks), or None"
        )


class WeakGroup:
    """A process group held by a weak reference; calling it gives the group (or None).

    A pipeline must not keep a group (its threads and sockets) alive past
    ``destroy_process_group()``. torch keeps every group until then, so a weak
    reference suffices.
    """

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self._ref = None if group is None else weakref.ref(group)

    def __call__(self) -> dist.ProcessGroup | None:
        return None if self._ref is None else self._ref()


def world_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


# Work handles kept a while, dropped oldest first (see keep).
_kept: collections.deque[dist.Work] = collections.deque(maxlen=256)  # a step's works: pieces of buckets


def keep(works: Iterable[dist.Work]) -> None:
    """Hold work handles a while longer, so that this thread drops the last reference.

    A gloo work holds tensors whose Python objects it may own, and, when started
    inside backward, autograd's thread-local state with a Python object in it:
    whichever thread drops the last reference takes the GIL to free them. gloo's
    worker thread lets go of a work just after completing it; if its reference is
    the last one and the interpreter is already exiting, CPython ends the thread
    inside a C++ destructor and the process aborts ("terminate called without an
    active exception"). A handle kept here is released by a later collective (or
    at exit) on this thread, long after the worker has let go.
    """
    _kept.extend(works)


def wait(work: dist.Work, what: str, timeout: datetime.timedelta | None) -> None:
    """Wait for an async collective, naming `what` if it fails."""
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)
    except Exception as error:  # gloo and NCCL raise RuntimeError subclasses with backend text
        raise CollectiveError(
            f"{what} failed: {error}. A peer process died, hung, or the network failed; "
            "check the other ranks' logs (the first failing rank names the cause)"
        ) from error


def run(collective, what: str, timeout: datetime.timedelta | None, *args, **kwargs) -> None:
    """Run a collective asynchronously and wait for it under `timeout`, naming `what` on failure."""
    try:
        work = collective(*args, async_op=True, **kwargs)
    except Exception as error:
        raise CollectiveError(f"{what} could not start: {error}") from error
    wait(work, what, timeout)
    keep([work])


def all_gather_varying(
    tensor: Tensor, group: dist.ProcessGroup, what: str, timeout: datetime.timedelta | None
) -> list[Tensor]:
    """Every rank's 1-D `tensor`, whose lengths differ between ranks (two collectives:
    the lengths, then the padded data)."""
    world = dist.get_world_size(group)
    length = torch.tensor([tensor.numel()], dtype=torch.int64, device=tensor.device)
    lengths = [torch.empty_like(length) for _ in range(world)]
    run(dist.all_gather, f"{what} (sizes)", timeout, lengths, length, group=group)
    sizes = torch.cat(lengths).tolist()  # the host must know the sizes to allocate
    padded = torch.cat([tensor, tensor.new_zeros(max(sizes) - tensor.numel())])
    gathered = [torch.empty_like(padded) for _ in range(world)]
    run(dist.all_gather, what, timeout, gathered, padded, group=group)
    return [g[:size] for g, size in zip(gathered, sizes)]


def check_same_parameters(
    names: Sequence[str],
    params: Sequence[Tensor],
    group: dist.ProcessGroup,
    owner: str,
    timeout: datetime.timedelta | None = None,
) -> None:
    """Make sure every rank holds the same parameter names, shapes and dtypes (two all-gathers,
    under `timeout` like every other collective, so a peer that never reaches setup is a
    `CollectiveError` naming it, not a wait of the process group's timeout).

    Raises:
        ValueError: naming the first differing parameter and the ranks that disagree.
        CollectiveError: a peer died or did not join within `timeout`.

    Example:
        >>> check_same_parameters(names, params, dist.group.WORLD, "gk.Average", datetime.timedelta(seconds=60))
    """
    mine = [(name, tuple(p.shape), str(p.dtype)) for name, p in zip(names, params)]
    # JSON text as bytes on the parameters' device (what the group's backend sends): not pickle.
    device = params[0].device if params else torch.device("cpu")
    encoded = torch.frombuffer(bytearray(json.dumps(mine).encode()), dtype=torch.uint8).to(device)
    what = f"{owner}: all-gather of the parameter names, shapes and dtypes (the ranks must hold the same)"
    everyone = [
        [(name, tuple(shape), dtype) for name, shape, dtype in json.loads(t.cpu().numpy().tobytes().decode())]
        for t in all_gather_varying(encoded, group, what, timeout)
    ]
    reference = everyone[0]
    for rank, theirs in enumerate(everyone[1:], start=1):
        if theirs == reference:
            continue
        for index in range(max(len(reference), len(theirs))):
            ours = reference[index] if index < len(reference) else None
            other = theirs[index] if index < len(theirs) else None
            if ours != other:
                raise ValueError(
                    f"{owner}: the ranks hold different models: parameter #{index} is {_describe(ours)} on rank 0 "
                    f"but {_describe(other)} on rank {rank}; build the same model on every rank, "
                    "with the same parameters frozen, before averaging"
                )


def broadcast_parameters(
    params: Sequence[Tensor], group: dist.ProcessGroup, timeout: datetime.timedelta | None
) -> None:
    """Copy rank 0's parameter values to every rank, so the replicas start equal (as DDP does)."""
    source = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for index, p in enumerate(params):
            run(
                dist.broadcast, f"broadcast of parameter #{index} from rank 0", timeout, p.data, src=source, group=group
            )


def _describe(entry: tuple[str, tuple[int, ...], str] | None) -> str:
    if entry is None:
        return "missing"
    name, shape, dtype = entry
    return f"{name!r} {list(shape)} {dtype}"


class PendingReduce:
    """Collectives in flight for one tensor; `wait()` gives their result (a compressed payload's
    decompressed sum over ranks), naming `what` if a collective fails or times out.

    The handle a compressor's ``start_reduce`` hook returns, and what `gk.Average` keeps per bucket.
    """

    def __init__(
        self,
        works: list[dist.Work],
        finish: Callable[[], Tensor],
        nbytes: int,
        what: str,
        timeout: datetime.timedelta | None,
    ) -> None:
        self.works = works
        self._finish = finish
        self.nbytes = nbytes
        self._what = what
        self._timeout = timeout
        #: after `wait()`, for a reduction told which parts this rank lacks (PowerSGD's ``absent``):
        #: per such part, > 0 where some rank had it, 0 where none did (a device tensor)
        self.present: Tensor | None = None

    def wait(self) -> Tensor:
        for work in self.works:
            wait(work, self._what, self._timeout)
        return self._finish()

    def as_future(self, then: Callable[[Tensor], Tensor]) -> torch.futures.Future[Tensor]:
        """A future of ``then(sum)`` that completes when the collectives do (no waiting here)."""
        futures = [work.get_future() for work in self.works]
        done: torch.futures.Future[list[Any]] = torch.futures.collect_all(futures) if futures else _completed([])
        return done.then(lambda _: then(self._finish()))


def _completed(value: Any) -> torch.futures.Future[Any]:
    future: torch.futures.Future[Any] = torch.futures.Future()
    future.set_result(value)
    return future
