"""Averaging over time: an exponential moving average of a model's parameters (Polyak averaging).

After every optimizer step the averaged copy moves a little towards the model::

    ema <- ema + (1 - d) * (param - ema)        d = min(decay, (1 + n) / (10 + n)) with warmup, else decay

The whole update is one ``torch._foreach_lerp_`` per (device, dtype) group, on
the parameters' own device; FSDP2's DTensor parameters are averaged shard by
shard (each rank lerps its local shard, nothing is communicated).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from gradkit import _checks
from gradkit._foreach import _foreach_supported, group_tensors

__all__ = ["EMA"]

_BUFFER_MODES = ("copy", "average")
_SAME_MODEL = "load the state of an EMA of this model"


class EMA:
    """An exponential moving average of a model's parameters, kept in ``ema.module``.

    Args:
        model: the ``nn.Module`` being trained (a DDP wrapper is unwrapped; FSDP2
            ``fully_shard`` modules are averaged shard-wise).
        decay: the weight of the past, in (0, 1); 0.999 averages over about the
            last 1,000 updates.
        warmup: use the ramp ``min(decay, (1 + n) / (10 + n))`` after n updates, so
            that the early, random weights are forgotten quickly; False uses the
            constant `decay` (torch's ``get_ema_multi_avg_fn``).
        every: average on every `every`-th call of `update` (the others return at once).
        buffers: ``"copy"`` (default) copies the model's buffers (BatchNorm statistics)
            at each update, as they are already running averages; ``"average"`` averages
            floating-point buffers like parameters (integer ones, such as
            ``num_batches_tracked``, are copied).

    ``ema.module`` is a deep copy of the model with gradients off, ready for
    evaluation. Every parameter is averaged, frozen ones included; integer ones are copied.
    An FSDP2 model cannot be deep-copied: its average is kept as DTensor shards
    (each rank lerps its own shard, nothing is communicated), ``ema.module`` raises,
    and ``ema.swapped()`` evaluates the average in the sharded model itself.

    Memory: one copy of the parameters and buffers. Time: one fused pass over
    them per update (reads both, writes the average), no host sync.

    Raises:
        TypeError / ValueError: for a `model` that is not an ``nn.Module`` or
            values out of range, e.g. `decay` outside (0, 1).

    Example:
        >>> ema = gk.EMA(model, decay=0.999)
        >>> pipe = gk.GradientPipeline(model, ema=ema)   # or ema.update() after optimizer.step()
        >>> with ema.swapped():                           # evaluate the averaged weights in `model`
        ...     evaluate(model)
    """

    def __init__(
        self, model: nn.Module, decay: float = 0.999, *, warmup: bool = True, every: int = 1, buffers: str = "copy"
    ) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}; pass the module being trained")
        if next(iter(model.parameters()), None) is None:
            raise ValueError(
                f"model must have parameters to average, got a {type(model).__name__} with none; "
                "pass the module being trained (build its layers first)"
            )
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < float(decay) < 1.0:
            raise ValueError(
                f"decay must be in (0, 1), got {decay!r}; pass e.g. decay=0.999 (closer to 1 averages over more steps)"
            )
        self.decay = float(decay)
        self.warmup = _checks.flag("warmup", warmup, "pass warmup=True for the ramp or False for a constant decay")
        self.every = _checks.positive_int("every", every, "pass how many update() calls make one update, e.g. 1")
        self.buffers = _checks.choice("buffers", buffers, _BUFFER_MODES)
        self.model = model
        self._module: nn.Module | None = None
        if _is_fsdp(model):
            # FSDP2 modules cannot be deep-copied: the average is kept as DTensor clones, shard by shard.
            self._params = {n: p.detach().clone() for n, p in model.named_parameters()}
            self._buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        else:
            self._module = copy.deepcopy(model)
            self._module.requires_grad_(False)
            self._params = dict(self._module.named_parameters())
            self._buffers = dict(self._module.named_buffers())
        self.updates = 0  # averaging updates done (n in the warmup ramp)
        self.calls = 0  # update() calls, for `every`

    @property
    def module(self) -> nn.Module:
        """The averaged model: a deep copy of the model holding the averaged weights."""
        if self._module is None:
            raise RuntimeError(
                "EMA.module: an FSDP2 (fully_shard) model cannot be deep-copied, so the average is kept shard-wise; "
                "evaluate it in the model itself with `with ema.swapped(): ...`, or read ema.state_dict()"
            )
        return self._module

    # -- the update ------------------------------------------------------------------

    def current_decay(self) -> float:
        """The decay the next averaging update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model's current weights (call it after ``optimizer.step()``).

        Raises:
            RuntimeError: when the model's parameters or buffers no longer match the
                average's (a name or shape changed); nothing is updated then.
        """
        calls = self.calls + 1
        if calls % self.every:
            self.calls = calls
            return
        pairs = self._pairs()  # raises before anything changes when the model no longer fits
        self.calls = calls
        weight = 1.0 - self.current_decay()
        averaged, current, copied_to, copied_from = [], [], [], []
        for _, (mine, theirs), is_param in pairs:
            mine, theirs = _local(mine), _local(theirs)
            if (mine.is_floating_point() or mine.is_complex()) and (is_param or self.buffers == "average"):
                averaged.append(mine)
                current.append(theirs)
            else:
                copied_to.append(mine)
                copied_from.append(theirs)
        for (device, _), (members, positions) in group_tensors(averaged).items():
            sources = [current[i] for i in positions]
            if _foreach_supported(device):
                torch._foreach_lerp_(members, sources, weight)
            else:
                for mine, theirs in zip(members, sources):
                    mine.lerp_(theirs, weight)
        if copied_to:
            torch._foreach_copy_(copied_to, copied_from)
        self.updates += 1

    def _pairs(self) -> list[tuple[str, tuple[Tensor, Tensor], bool]]:
        """(name, (average's tensor, model's tensor), is a parameter), checked to match."""
        model_params = dict(self.model.named_parameters())
        model_buffers = dict(self.model.named_buffers())
        mine_params, mine_buffers = self._params, self._buffers
        if model_params.keys() != mine_params.keys() or model_buffers.keys() != mine_buffers.keys():
            theirs, mine = set(model_params) | set(model_buffers), set(mine_params) | set(mine_buffers)
            first = min(theirs ^ mine)
            where = "the model" if first in theirs else "the average"
            raise RuntimeError(
                f"EMA.update: {first!r} is only in {where}; the model's parameters or buffers changed since "
                "gk.EMA(model) was built: build a new EMA for the new model"
            )
        pairs = [(n, (mine_params[n], p), True) for n, p in model_params.items()]
        pairs += [(n, (mine_buffers[n], b), False) for n, b in model_buffers.items()]
        for name, (mine, theirs), _ in pairs:
            if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
                raise RuntimeError(
                    f"EMA.update: {name!r} is {_describe(theirs)} in the model but {_describe(mine)} in the average; "
                    "the model changed shape or dtype since gk.EMA(model) was built: build a new EMA for it"
                )
        return pairs

    # -- evaluation ------------------------------------------------------------------

    @contextlib.contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """Put the averaged weights (and buffers) into the model for the block, and the trained ones back after.

        Memory: one temporary copy of the model's parameters and buffers.

        Example:
            >>> with ema.swapped():
            ...     accuracy = evaluate(model)
        """
        pairs = [(_local(mine), _local(theirs)) for _, (mine, theirs), _ in self._pairs()]
        mine = [m for m, _ in pairs]
        theirs = [t for _, t in pairs]
        with torch.no_grad():
            saved = [t.clone() for t in theirs]
            if theirs:
                torch._foreach_copy_(theirs, mine)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                if theirs:
                    torch._foreach_copy_(theirs, saved)

    # -- state -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and buffers (cloned) and the update counters: an exact resume."""
        return {
            "module": {name: t.detach().clone() for name, t in {**self._params, **self._buffers}.items()},
            "updates": self.updates,
            "calls": self.calls,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned.

        Raises:
            TypeError / ValueError: for missing keys or an average of another model;
                the message names the first mismatching entry. Nothing changes then.
        """
        _checks.state_keys("EMA", state, {"module", "updates", "calls"})
        updates = _checks.non_negative_int("updates", state["updates"], "pass the state from EMA.state_dict()")
        calls = _checks.non_negative_int("calls", state["calls"], "pass the state from EMA.state_dict()")
        saved = state["module"]
        if not isinstance(saved, dict):
            raise TypeError(f"EMA.load_state_dict: 'module' must be a dict of tensors, got {type(saved).__name__}")
        own = {**self._params, **self._buffers}
        for name in list(own) + [n for n in saved if n not in own]:
            if name not in saved:
                raise ValueError(f"EMA.load_state_dict: {name!r} is missing from the state; {_SAME_MODEL}")
            if name not in own:
                raise ValueError(f"EMA.load_state_dict: the state has {name!r}, this model has not; {_SAME_MODEL}")
            value, target = saved[name], own[name]
            if not isinstance(value, Tensor) or value.shape != target.shape or value.dtype != target.dtype:
                got = _describe(value) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"EMA.load_state_dict: {name!r} is {got} in the state but {_describe(target)} here; {_SAME_MODEL}"
                )
        with torch.no_grad():
            for name, target in own.items():
                _local(target).copy_(_local(saved[name]))
        self.updates, self.calls = updates, calls

    def __repr__(self) -> str:
        fields = f"decay={self.decay}, warmup={self.warmup}, every={self.every}, buffers={self.buffers!r}"
        return f"EMA({fields}, updates={self.updates})"


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself: the average is kept shard-wise."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _describe(tensor: Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
