"""Local SGD: every process steps on its own gradient, and the parameters are averaged on a schedule."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradkit import _checks, distributed
from gradkit.averaging.collectives import as_timeout, replicate, sum_flat_
from gradkit.averaging.sync import SyncControl

__all__ = ["ModelAverager"]


class ModelAverager(SyncControl):
    """Local SGD: each process steps on its own gradient; parameters are averaged
    every `period` optimizer steps (Lin et al. 2020, "Don't Use Large Mini-Batches,
    Use Local SGD"; torch's PeriodicModelAverager).

    Pass it as ``GradientPipeline(average=gk.ModelAverager(8))``, or use it on its
    own: call ``averager.after_step(model.parameters())`` after each optimizer step.
    After the warm-up, parameters are averaged after steps warmup+1,
    warmup+1+period, ... (counted from 1), the steps at which torch's
    PeriodicModelAverager averages. During the first `warmup_steps` steps they
    are averaged after every step, so the replicas move together while training
    is most unstable; torch's averager does nothing then (its users run DDP's
    gradient all-reduce during warm-up).
    Steps are counted per window, skipped or not, so every rank averages at the
    same steps.

    Args:
        period: average every `period` steps (>= 1).
        warmup_steps: steps at the start that average every step (>= 0).
        group: the process group (default: the whole world).
        timeout: seconds to wait for a collective; None uses the group's.

    Memory: one flat copy of the parameters of one (device, dtype) while averaging.

    Example:
        >>> pipe = gk.GradientPipeline(model, average=gk.ModelAverager(period=8, warmup_steps=100))
    """

    def __init__(
        self,
        period: int,
        *,
        warmup_steps: int = 0,
        group: dist.ProcessGroup | None = None,
        timeout: float | None = None,
    ) -> None:
        self.period = _checks.positive_int("period", period, "pass how many steps to take between averages, e.g. 8")
        self.warmup_steps = _checks.non_negative_int("warmup_steps", warmup_steps, "pass 0 for no warm-up")
        self.timeout = as_timeout(timeout)
        self._group = distributed.WeakGroup(distributed.resolve_group(group, "gk.ModelAverager"))
        self._group_arg = distributed.WeakGroup(group)
        self.step = 0
        self._attached = False
        self._count = 0  # parameters at the last check; a step that passes another number is checked again

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The process group (None: one process, or the group was destroyed); held weakly."""
        return self._group()

    def attach(
        self,
        names: Sequence[str],
        params: Sequence[Tensor],
        *,
        sparse: Collection[str] = (),
        module: nn.Module | None = None,
        broadcast: bool = True,
    ) -> None:
        """Check that the ranks hold the same parameters and (by default) copy rank 0's
        values to all (with `module`: frozen parameters and buffers too), so the replicas
        start equal; the pipeline calls it at setup."""
        self._group = distributed.WeakGroup(distributed.resolve_group(self._group_arg(), "gk.ModelAverager"))
        self._attached = True
        self._count = len(params)
        if self.group is not None:
            if broadcast:
                replicate(names, params, module, self.group, self.timeout, "gk.ModelAverager", buffers=True)
            else:
                distributed.check_same_parameters(names, params, self.group, "gk.ModelAverager", self.timeout)

    def after_step(self, params: Sequence[Tensor], *, skipped: bool = False, contributed: bool = True) -> None:
        """Count one optimizer step and average the parameters if the schedule says so."""
        params = list(params)
        if not self._attached or len(params) != self._count:
            # Used on its own: the first step already ran, so only check. A list that changed (layers unfrozen
            # on every rank) is checked again: ranks whose lists differ get a clear error within the timeout
            # before any all-reduce of different sizes, which would crash or hang.
            self.attach([str(i) for i in range(len(params))], params, broadcast=False)
        self.step += 1
        if self.group is None:
            return
        if self.averages_after(self.step):
            self.average_now(params)

    def averages_after(self, step: int) -> bool:
        """Whether the parameters are averaged after optimizer step `step` (counted from 1).

        Every step of the warm-up, then the first step after it and every `period`-th
        step from there: steps warmup+1, warmup+1+period, ... (torch's
        PeriodicModelAverager averages at those same steps; during its warm-up it
        averages nothing, leaving that to DDP's gradient all-reduce)."""
        return step <= self.warmup_steps or (step - 1 - self.warmup_steps) % self.period == 0

    def average_now(self, params: Sequence[Tensor]) -> None:
        """Replace every parameter by its mean over the group."""
        if self.group is None:
            return
        what = f"gk.ModelAverager: all-reduce of parameters at step {self.step}"
        with torch.no_grad():
            sum_flat_(list(params), self.group, what, self.timeout, divide_by=dist.get_world_size(self.group))

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _checks.state_keys("ModelAverager", state, {"step"})
        self.step = _checks.non_negative_int("step", state["step"], "pass the state from ModelAverager.state_dict()")
