"""gradkit's compression as a DDP communication hook: one line for users already on DDP.

    state, hook = gk.ddp_comm_hook(gk.TopK(0.01), model=ddp_model)
    ddp_model.register_comm_hook(state, hook)

DDP hands the hook each bucket's flat gradient (the sum of this rank's
gradients for the bucket's parameters) and expects a future of the average
over ranks. The hook compresses with the same machinery as `gk.Average`;
error-feedback residuals are keyed by parameter name (or, without `model=`,
by the order in which parameters are first seen), never by bucket index, so
they survive DDP's bucket rebuild after the first iteration.

With ``node_size=L`` (dense only) each bucket is averaged in two levels, as by
``gk.Average(node_size=L)``: reduce-scatter inside the node, all-reduce of the
shard across nodes, all-gather inside the node (on gloo, an all-reduce and
broadcasts in their place: `gradkit.averaging.node_hops`).
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects.
import datetime
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradkit import _names, distributed
from gradkit.averaging import as_timeout, effective_compressor, load_compressor_state, start_reduce
from gradkit.averaging.hierarchical import NodeGroups, check_node_size, node_size_for
from gradkit.compression.base import Compressor

__all__ = ["ddp_comm_hook", "CommHookState"]


class CommHookState:
    """The hook's state: the compressor (with its residuals), the group, parameter names."""

    def __init__(
        self,
        compressor: Compressor | None,
        group: dist.ProcessGroup | None,
        names: dict[int, str],
        timeout: datetime.timedelta | None,
        required: tuple[str, ...] = (),
    ) -> None:
        self.compressor = compressor
        self.group = group
        self.timeout = timeout
        self._names = names
        # Names known before any bucket (from model=) are checked on load; "paramN" names are not.
        self._known = tuple(names.values())
        self._required = required
        self.bytes_sent = 0
        self.nodes: NodeGroups | None = None  # set for two-level averaging (node_size=)

    def name_of(self, param: Tensor) -> str:
        name = self._names.get(id(param))
        if name is None:  # no model given: name by first appearance, stable across rebuilds
            name = self._names[id(param)] = f"param{len(self._names)}"
        return name

    def state_dict(self) -> dict[str, Any]:
        return {"compressor": self.compressor.state_dict() if self.compressor is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_compressor_state("CommHookState", self.compressor, state, self._known, self._required)


def ddp_comm_hook(
    compressor: Compressor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    model: nn.Module | None = None,
    error_feedback: bool | None = None,
    timeout: float | None = None,
    node_size: int | None = None,
) -> tuple[CommHookState, Any]:
    """Build ``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``.

    Args:
        compressor: a gradkit compressor; None all-reduces densely (like DDP's default).
        group: the process group (default: the whole world).
        model: the DDP model, to key residuals by parameter name (recommended).
        error_feedback: as in `gk.Average`: biased compressors get it by default.
        timeout: seconds to wait for a collective; None uses the group's.
        node_size: processes per node for two-level averaging, as in `gk.Average`: full precision
            inside each node, 1/node_size of each bucket across nodes. None or 1: flat (the default
            keeps DDP's overlap of communication with backward).
            Dense only, and without overlap: each bucket's three hops run inside the hook, so that
            every rank issues them in one order. For compression between nodes use
            ``gk.GradientPipeline(model, average=gk.Average(compressor, node_size=...))``.

    Returns:
        The state (with ``state_dict()``) and the hook.

    Residuals are committed after every bucket: DDP does not tell the hook when
    a step is skipped, so a NaN gradient would enter them; use
    `gk.GradientPipeline` with `gk.Average` for skip-aware compression.

    Example:
        >>> state, hook = gk.ddp_comm_hook(gk.PowerSGD(rank=2), model=ddp_model)
        >>> ddp_model.register_comm_hook(state, hook)
    """
    # Every argument is checked before the environment, so a bad value is named as such.
    effective = effective_compressor(compressor, error_feedback)
    seconds = as_timeout(timeout)
    node_size = check_node_size(node_size)
    if node_size is not None and node_size > 1 and effective is not None:
        raise ValueError(
            f"gk.ddp_comm_hook(node_size={node_size}) averages in full precision only; for "
            f"{type(compressor).__name__} between nodes use gk.GradientPipeline(model, "
            "average=gk.Average(compressor, node_size=...)) in place of DDP, or node_size=None for a flat hook"
        )
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            "model must be the DDP-wrapped nn.Module (to name residuals by parameter) or None, got "
            f"{type(model).__name__}"
        )
    distributed.check_group_type(group)
    resolved = distributed.resolve_group(group, "gk.ddp_comm_hook")
    if resolved is None:
        raise ValueError(
            "gk.ddp_comm_hook needs an initialized process group (DDP does too); call "
            "torch.distributed.init_process_group first"
        )
    pairs = _names.named_parameters(model) if model is not None else []
    names = {id(p): name for name, p in pairs}
    # DDP buckets every parameter that requires grad: each one's state is saved.
    state = CommHookState(effective, resolved, names, seconds, tuple(name for name, p in pairs if p.requires_grad))
    if effective is None:
        # Dense: two levels when asked for and there are several nodes.
        levels = node_size_for(node_size, resolved) if node_size is not None else None
        if levels is not None:
            state.nodes = NodeGroups.build(levels, seconds)
            return state, _two_level_hook
    return state, _hook


def _two_level_hook(state: CommHookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """The bucket's mean in three hops: reduce-scatter in the node, all-reduce across nodes, all-gather.

    Run here, one hop after another: started from a future's callback thread, the cross-node
    all-reduces of two buckets could reach the cross group in a different order on each rank.
    """
    nodes = state.nodes
    assert nodes is not None
    flat = bucket.buffer()
    size = flat.numel()
    per_shard = -(-size // nodes.node_size)
    if per_shard * nodes.node_size == size and flat.is_contiguous():
        padded = flat  # splits evenly: the hops work in DDP's buffer, no copy in or out
    else:
        padded = flat.new_zeros(per_shard * nodes.node_size)  # equal shards; the padding adds zeros
        padded[:size].copy_(flat)
    hops = nodes.hops(flat.device.type)
    shard = hops.shard_buffer(padded)
    what = f"gk.ddp_comm_hook: bucket {bucket.index()}"
    pieces, others = hops.start_sum(padded, shard)
    summed = [work for _, work in pieces] + others
    for work in summed:
        distributed.wait(work, f"{what}, sum in the node", state.timeout)
    if nodes.nodes > 1:
        distributed.run(dist.all_reduce, f"{what}, all-reduce across nodes", state.timeout, shard, group=nodes.cross)
    shard.div_(dist.get_world_size(state.group))
    gathered = hops.start_gather(padded, shard)
    for work in gathered:
        distributed.wait(work, f"{what}, gather in the node", state.timeout)
    distributed.keep([*summed, *gathered])
    if padded is not flat:
        flat.copy_(padded[:size])
    state.bytes_sent = shard.numel() * shard.element_size() if nodes.nodes > 1 else 0  # across nodes
    done: torch.futures.Future[Tensor] = torch.futures.Future()
    done.set_result(flat)
    return done


def _hook(state: CommHookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    flat = bucket.buffer()
    world = dist.get_world_size(state.group)
    what = f"gk.ddp_comm_hook: bucket {bucket.index()}"
    if state.compressor is None:
        state.bytes_sent = flat.numel() * flat.element_size()
        averaged = flat.div_(world)
        work = dist.all_reduce(averaged, group=state.group, async_op=True)
        distributed.keep([work])  # see distributed.keep: gloo's worker must not free it at exit
        return work.get_future().then(lambda fut: fut.value()[0])
    layout = tuple((state.name_of(p), tuple(p.shape)) for p in bucket.parameters())
    pending = start_reduce(state.compressor, flat, layout, state.group, 1.0 / world, what, state.timeout)
    distributed.keep(pending.works)
    state.bytes_sent = pending.nbytes
    compressor = state.compressor

    def finish(summed: Tensor) -> Tensor:
        compressor.commit()
        return summed.to(flat.dtype)

    if compressor.start_reduce is not None:
        # A second round of communication (PowerSGD) started from a future's callback
        # thread could interleave with the next bucket's collectives differently on each
        # rank; finishing here keeps one order on every rank, at the cost of overlap.
        done: torch.futures.Future[Tensor] = torch.futures.Future()
        done.set_result(finish(pending.wait()))
        return done
    return pending.as_future(finish)
