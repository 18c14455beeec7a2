"""Local SGD: every process steps on its own gradient, and the parameters are averaged on a schedule."""

from __future__ import annotations

import zlib
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradkit import _checks, distributed
from gradkit._scalars import from_host
from gradkit.averaging.collectives import as_timeout, replicate, sum_flat_
from gradkit.averaging.sync import SyncControl
from gradkit.context import same_tensors

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

    Cost: inside a `GradientPipeline`, one all-reduce of the parameters per averaging and nothing
    else: the pipeline passes the list it attached (checked across ranks at setup) and refuses to
    let it change (unfreezing a layer), so there is no check per averaging. Used on its own
    (`after_step` with any list) and in `average_now`, each averaging is preceded by a check: one
    all-reduce of six int64 numbers (the parameter count, the entry count and a digest of the shapes
    and dtypes), read on the host, so a host sync per averaging (every step during the warm-up,
    then every `period` steps). In return, ranks whose parameter lists differ (one unfroze a layer,
    the others did not) get a clear ``ValueError`` on every rank instead of an all-reduce of
    different sizes (a hang on gloo, undefined on NCCL).

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
        #: the tensors `attach` was given (the pipeline's, which it never changes): `after_step` with these
        #: very tensors needs no check across ranks, the setup's covers it
        self._fixed: tuple[Tensor, ...] | None = None

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The process group (None: one process, or the group was destroyed); held weakly."""
        return self._group()

    @property
    def attached(self) -> bool:
        """Whether `attach` ran (a pipeline's, or the first standalone `after_step`'s) and no `detach` since."""
        return self._attached

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
        start equal; the pipeline calls it at setup.

        The tensors of `params` are taken as fixed: `after_step` given these same tensors, in this
        order, skips the check across ranks before each averaging, which this setup check covers
        (the pipeline passes its own list, which never changes). Other tensors are checked."""
        self._bind(names, params, module=module, broadcast=broadcast)
        self._fixed = tuple(params)

    def _bind(
        self, names: Sequence[str], params: Sequence[Tensor], *, module: nn.Module | None, broadcast: bool
    ) -> None:
        self._group = distributed.WeakGroup(distributed.resolve_group(self._group_arg(), "gk.ModelAverager"))
        self._attached = True
        if self.group is not None:
            if broadcast:
                replicate(names, params, module, self.group, self.timeout, "gk.ModelAverager", buffers=True)
            else:
                distributed.check_same_parameters(names, params, self.group, "gk.ModelAverager", self.timeout)

    def _is_fixed(self, params: list[Tensor]) -> bool:
        # Identity on the host, tensor by tensor: a list changed in place (a layer appended) is not fixed.
        return self._fixed is not None and same_tensors(params, self._fixed)

    def detach(self) -> None:
        """Forget the attach: used on its own afterwards, the first `after_step` checks the ranks again,
        and every averaging is checked."""
        self._attached = False
        self._fixed = None

    def after_step(self, params: Sequence[Tensor], *, skipped: bool = False, contributed: bool = True) -> None:
        """Count one optimizer step and average the parameters if the schedule says so.

        Before each averaging the ranks compare their lists (one small all-reduce, read on the host),
        unless `params` holds the very tensors given to `attach` (the pipeline's): those were checked at setup.

        Raises:
            ValueError: at an averaging step, on every rank, when the ranks pass different parameter
                lists (count, shapes or dtypes); nothing is averaged or counted then.
            CollectiveError: a peer died or did not join within the timeout.
        """
        params = list(params)
        if not self._attached:
            # Used on its own: the first step already ran, so only check. A list that changes later (layers
            # unfrozen) is checked at each averaging, on every rank alike.
            self._bind([str(i) for i in range(len(params))], params, module=None, broadcast=False)
        group = self.group
        averages = group is not None and self.averages_after(self.step + 1)
        if averages and not self._is_fixed(params):
            self._check_same_lists(params, group, self.step + 1)
        self.step += 1
        if averages:
            self._average(params, group)

    def averages_after(self, step: int) -> bool:
        """Whether the parameters are averaged after optimizer step `step` (counted from 1).

        Every step of the warm-up, then the first step after it and every `period`-th
        step from there: steps warmup+1, warmup+1+period, ... (torch's
        PeriodicModelAverager averages at those same steps; during its warm-up it
        averages nothing, leaving that to DDP's gradient all-reduce)."""
        return step <= self.warmup_steps or (step - 1 - self.warmup_steps) % self.period == 0

    def average_now(self, params: Sequence[Tensor]) -> None:
        """Replace every parameter by its mean over the group.

        Raises:
            ValueError: on every rank, when the ranks pass different parameter lists.
            CollectiveError: a peer died or did not join within the timeout.
        """
        group = self.group
        if group is None:
            return
        params = list(params)
        self._check_same_lists(params, group, self.step)
        self._average(params, group)

    def _average(self, params: list[Tensor], group: dist.ProcessGroup) -> None:
        what = f"gk.ModelAverager: all-reduce of parameters at step {self.step}"
        with torch.no_grad():
            sum_flat_(params, group, what, self.timeout, divide_by=dist.get_world_size(group))

    def _check_same_lists(self, params: list[Tensor], group: dist.ProcessGroup, step: int) -> None:
        """Refuse, on every rank alike, parameter lists that differ across ranks: one all-reduce (MAX) of
        each number and its negation gives every rank the group's minimum and maximum of each."""
        count, numel = len(params), sum(p.numel() for p in params)
        # crc32 of the text, not hash(): str hashes differ between processes.
        layout = zlib.crc32(repr([(tuple(p.shape), p.dtype) for p in params]).encode())
        device = params[0].device if params else torch.device("cpu")
        mine = from_host([count, -count, numel, -numel, layout, -layout], device, torch.int64)
        what = f"gk.ModelAverager: all-reduce of parameters' count and shapes at step {step}"
        distributed.run(dist.all_reduce, what, self.timeout, mine, op=dist.ReduceOp.MAX, group=group)
        most_params, fewest_params, most, fewest, layout_max, layout_min = mine.tolist()  # the one host read
        fewest_params, fewest, layout_min = -fewest_params, -fewest, -layout_min
        fix = (
            "pass the same parameters on every rank: freeze or unfreeze layers on all ranks alike, "
            "or rebuild the pipeline (and the averager) on every rank"
        )
        if fewest_params != most_params:
            raise ValueError(
                f"gk.ModelAverager: the ranks pass different parameter lists at step {step}: between "
                f"{fewest_params} and {most_params} parameters (this rank: {count}); {fix}"
            )
        if fewest != most or layout_min != layout_max:
            raise ValueError(
                f"gk.ModelAverager: the ranks pass {count} parameters each at step {step}, but their shapes "
                f"or dtypes differ (between {fewest} and {most} entries in all, this rank: {numel}); {fix}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _checks.state_keys("ModelAverager", state, {"step"})
        self.step = _checks.non_negative_int("step", state["step"], "pass the state from ModelAverager.state_dict()")
