"""Sync control for FSDP2 models (``torch.distributed.fsdp.fully_shard``).

FSDP2 reduce-scatters each gradient during backward and leaves every rank with
its shard, as a ``DTensor``. The pipeline needs three things from it:

- **when** it communicates: FSDP's ``set_requires_gradient_sync`` is its
  ``no_sync``. Two accumulation modes are offered (``reduce="every"`` or
  ``reduce="boundary"``, see `FSDPSync`);
- **what** it reduces: FSDP divides by the data-parallel size in its
  reduce-scatter (through AVG or PREMUL_SUM, which gloo lacks, and gloo's AVG was
  once silently wrong, pytorch #162338). gradkit turns that off: it forces SUM
  reductions with a divide factor of 1 on every FSDP module, so the shards hold
  the gradient *summed* over ranks, and the pipeline divides once by the global
  item count (or micro-steps x ranks), exactly as under DDP;
- the global item count, all-reduced on the device over the data-parallel
  ranks only (tensor-parallel peers see the same items and are not counted).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradkit import _dtensor, _foreach
from gradkit.accumulation import Items
from gradkit.averaging.collectives import global_count
from gradkit.averaging.sync import SyncControl, grads_of

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch built without distributed support
    FSDPModule = None  # type: ignore[assignment,misc]

__all__ = ["FSDPSync", "is_fsdp", "check_average", "MODES"]

#: the accumulation modes of `FSDPSync`
MODES = ("every", "boundary")


def is_fsdp(model: object) -> bool:
    """Whether `model` is, or holds, a module wrapped by FSDP2's ``fully_shard``."""
    return (
        FSDPModule is not None
        and isinstance(model, nn.Module)
        and any(isinstance(m, FSDPModule) for m in model.modules())
    )


def check_average(average: SyncControl) -> SyncControl:
    """`average` if it can drive an FSDP2 model (an `FSDPSync`), else a ValueError saying what to pass."""
    if isinstance(average, FSDPSync):
        return average
    what = "compression" if getattr(average, "compressor", None) is not None else "gradkit's own averaging"
    raise ValueError(
        f"average={type(average).__name__}(...) cannot drive a model wrapped with fully_shard: "
        f"FSDP2 reduce-scatters the gradients itself into shards, and {what} needs replicated gradients "
        "(a DDP-wrapped model, or gk.Average on an unsharded one); "
        "pass average=None (or gk.FSDPSync(model, reduce='boundary')) to let FSDP2 reduce them"
    )


class FSDPSync(SyncControl):
    """How the pipeline drives an FSDP2 model: when to reduce-scatter, and by what to divide.

    Chosen automatically by `GradientPipeline` for a model that holds
    ``fully_shard`` modules (``reduce="every"``); build it yourself and pass it as
    ``average=`` to pick the other mode.

    Args:
        model: the root module (``fully_shard`` applied to it or to its submodules).
        reduce: when gradients are reduce-scattered within an accumulation window:

            - ``"every"`` (default): after every micro-batch. Each rank keeps only its
              shard of the window's gradient (1/N of the gradient memory), and sends
              one reduce-scatter per micro-batch. torchtitan's default.
            - ``"boundary"``: only on the window's last micro-batch. Each rank keeps
              the *full* unsharded gradient of its micro-batches until then (FSDP's
              ``set_requires_gradient_sync(False)``), and sends one reduce-scatter
              per window: least communication, most memory.

            Both give the full-batch gradient; the order of the additions differs,
            so the last bits may.

    Raises:
        TypeError: `model` holds no ``fully_shard`` module.
        ValueError: `reduce` is not one of "every", "boundary".

    Memory: ``"every"``: the sharded gradient (P/N). ``"boundary"``: the unsharded
    gradient of every parameter (P) from the first micro-batch to the boundary.

    Example:
        >>> for layer in model.layers: fully_shard(layer)
        >>> fully_shard(model)
        >>> pipe = gk.GradientPipeline(model, accumulation_steps=4, average=gk.FSDPSync(model, reduce="boundary"))
    """

    #: FSDP all-gathers in every forward, so every rank runs the same micro-batches: when one
    #: rank's window is empty, all are, and an empty flush has nothing to join.
    joins_empty_flush = False

    def __init__(self, model: nn.Module, *, reduce: str = "every") -> None:
        if not is_fsdp(model):
            raise TypeError(
                f"FSDPSync needs a model wrapped with torch.distributed.fsdp.fully_shard, got {type(model).__name__}; "
                "call fully_shard(module) on the model (and its layers) first, or pass average=gk.Average() for a "
                "replicated model"
            )
        if reduce not in MODES:
            raise ValueError(
                f"reduce must be one of {MODES}, got {reduce!r}; pass 'every' (least memory) or 'boundary' (least "
                "communication)"
            )
        self.model = model
        self.reduce = reduce
        self.modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        groups = [g for m in self.modules for g in m._get_fsdp_state()._fsdp_param_groups]
        # The data-parallel groups: FSDP's shard group, and HSDP's replicate group.
        self._groups: list[dist.ProcessGroup] = []
        if groups:
            info = groups[0].mesh_info
            for attr in ("replicate_process_group", "shard_process_group"):
                group = getattr(info, attr, None)
                if group is not None and dist.get_world_size(group) > 1:
                    self._groups.append(group)
        self.world_size = 1
        for group in self._groups:
            self.world_size *= dist.get_world_size(group)
        for module in self.modules:
            # Plain sums on every backend: gloo has no PREMUL_SUM; the pipeline divides once, by the item count.
            module.set_force_sum_reduction_for_comms(True)
            module.set_gradient_divide_factor(1.0)
        self._names: dict[int, str] = {}

    def attach(
        self,
        names: Sequence[str],
        params: Sequence[Tensor],
        *,
        sparse: Collection[str] = (),
        module: nn.Module | None = None,
    ) -> None:
        self._names = {id(p): name for name, p in zip(names, params)}

    def set_sync(self, enabled: bool) -> None:
        if self.reduce == "boundary":
            for module in self.modules:
                module.set_requires_gradient_sync(enabled, recurse=False)

    def global_items(self, items: Items) -> Items:
        return global_count(items, self._device(), self._groups, "FSDP pipeline: all-reduce of the item count", None)

    def reduce_(self, params: Sequence[Tensor], scale: Tensor | float, *, complete: bool) -> None:
        if self.reduce == "boundary" and not complete:
            self._reduce_scatter_accumulated()
        # The shards hold sums over ranks (SUM, divide factor 1): scale them on the local pieces,
        # since a DTensor does not mix with a plain scale tensor.
        _foreach.scale_(_dtensor.locals_of(grads_of(params)), scale)

    def _reduce_scatter_accumulated(self) -> None:
        """Reduce-scatter a flushed window's accumulated unsharded gradients (its last backward ran without sync).

        FSDP2 has no public call for it: run each parameter group's post-backward
        again with sync on (it reduce-scatters what it accumulated) and wait for it.
        """
        for module in self.modules:
            module.set_requires_gradient_sync(True, recurse=False)
        for module in self.modules:
            for group in module._get_fsdp_state()._fsdp_param_groups:
                if any(self._accumulated(p) is not None for p in group.fsdp_params):
                    group.post_backward()
        for module in self.modules:
            for group in module._get_fsdp_state()._fsdp_param_groups:
                group.finalize_backward()

    @staticmethod
    def _accumulated(fsdp_param: Any) -> Tensor | None:
        """The unsharded gradient FSDP accumulates with sync off (in the reduce dtype under mixed precision)."""
        if fsdp_param.unsharded_accumulated_grad is not None:
            return fsdp_param.unsharded_accumulated_grad
        unsharded = getattr(fsdp_param, "_unsharded_param", None)
        return None if unsharded is None else unsharded.grad

    def after_step(self, params: Sequence[Tensor], *, skipped: bool = False, contributed: bool = True) -> None:
        if self.reduce == "boundary":
            # A step that raised mid-window leaves nothing behind either.
            for p in self._fsdp_params():
                p.unsharded_accumulated_grad = None
                unsharded = getattr(p, "_unsharded_param", None)
                if unsharded is not None:
                    unsharded.grad = None

    def bytes_sent(self) -> int:
        return 0  # counted by FSDP, not here

    # -- state: the unsharded partial gradients of "boundary" mode ----------------------

    def state_dict(self) -> dict[str, Any]:
        """Mid-window in ``"boundary"`` mode: this rank's unsharded partial gradients, by parameter name.

        (In ``"every"`` mode the partial gradients are the sharded ``p.grad``, which the
        pipeline's own state holds.) Plain tensors, loadable with ``torch.load(weights_only=True)``.
        """
        partial = {}
        for p in self._fsdp_params():
            grad = self._accumulated(p)
            if grad is not None:
                partial[self._names.get(id(p.sharded_param), p._param_fqn)] = _dtensor.local(grad).detach().clone()
        return {"unsharded_grads": partial} if partial else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            for p in self._fsdp_params():
                p.unsharded_accumulated_grad = None
            return
        if set(state) != {"unsharded_grads"} or not isinstance(state["unsharded_grads"], dict):
            raise ValueError(
                "FSDPSync.load_state_dict: expected {'unsharded_grads': {name: tensor}}, got keys "
                f"{sorted(state)}; pass the state saved with the same FSDP model"
            )
        by_name = {self._names.get(id(p.sharded_param)): p for p in self._fsdp_params()}
        grads = state["unsharded_grads"]
        for name, grad in grads.items():
            p = by_name.get(name)
            if p is None or not isinstance(grad, Tensor) or tuple(grad.shape) != tuple(p._orig_size):
                raise ValueError(
                    f"FSDPSync.load_state_dict: partial gradient {name!r} does not fit this model; load it into the "
                    "model it was saved from"
                )
        if self.reduce != "boundary":
            raise ValueError(
                "FSDPSync.load_state_dict: the state holds unsharded partial gradients of reduce='boundary'; build "
                "FSDPSync with reduce='boundary'"
            )
        for name, grad in grads.items():
            p = by_name[name]
            dtype = getattr(p, "reduce_dtype", None) or p.sharded_param.dtype
            # FSDP adds the next micro-batch's gradient into this buffer before reduce-scattering it.
            p.unsharded_accumulated_grad = grad.to(device=p.device, dtype=dtype).clone()

    # -- helpers -------------------------------------------------------------------------

    def _fsdp_params(self) -> list[Any]:
        return [p for m in self.modules for g in m._get_fsdp_state()._fsdp_param_groups for p in g.fsdp_params]

    def _device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")
