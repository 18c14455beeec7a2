"""Find the first module, in backward order, that turned the gradient non-finite.

The cheap path (every step) only sees per-parameter norms, and a NaN spreads
to every parameter upstream of where it appeared. To name its origin, the
tracker arms this locator after a non-finite step: hooks then record, for
each module, whether the gradient arriving at its output and the gradients it
produces (for its inputs and its own parameters) are finite. The origin is
the first module in backward order that received a finite output gradient
and produced a non-finite one.

Hooks are tensor hooks registered on module outputs and inputs from a forward
hook (not ``register_full_backward_hook``, which breaks modules followed by
in-place operations such as ``ReLU(inplace=True)``) plus hooks on parameters.
Each records one flag tensor on the device; the flags are read once, when the
tracker asks for the result. Nothing is installed until a non-finite step
happens, so healthy training never pays for it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradkit import _dtensor
from gradkit.tracking import stats as _stats
from gradkit.tracking.alerts import GLOBAL, Alert, logger
from gradkit.tracking.stats import ROOT, module_of

__all__ = ["LOSS", "GradRefs", "NonfiniteLocator", "NonfiniteWatch", "nonfinite_counts"]

#: the name given when the gradient was non-finite before reaching any module
LOSS = "(loss)"


class NonfiniteLocator:
    """Hooks that locate the first module producing a non-finite gradient.

    Args:
        module: the model, or None (then only parameter hooks are used and the
            origin is the module of the first parameter, in backward order,
            whose gradient is non-finite).
        names, params: the tracked parameters.

    Memory: one boolean per hook firing while armed.
    """

    def __init__(self, module: nn.Module | None, names: Sequence[str], params: Sequence[Tensor]) -> None:
        self.module = module
        self.names, self.params = list(names), list(params)
        self._handles: list = []
        self._events: list[tuple[str, str, Tensor]] = []  # (module, "out"|"in"|"param", all finite?)

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        """Install the hooks; they record from the next forward/backward on."""
        if self.armed:
            return
        self._events = []
        if self.module is not None:
            for name, sub in self.module.named_modules():
                self._handles.append(sub.register_forward_hook(self._forward_hook(name or ROOT)))
        for name, param in zip(self.names, self.params):
            if param.requires_grad:
                self._handles.append(param.register_hook(self._recorder(module_of(name), "param")))

    def disarm(self) -> None:
        """Remove every hook (tensor hooks on activations die with the graph)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def result(self) -> tuple[str, str] | None:
        """(module name, how it was found) of the origin, or None if every recorded gradient was finite.

        Reads the recorded flags in one host transfer, and forgets them.
        """
        events, flags = self.take()
        return None if flags is None else self.decide(events, flags.tolist())

    def take(self) -> tuple[list[tuple[str, str]], Tensor | None]:
        """The recorded (module, kind) firings and their finite flags as one device tensor (None
        when nothing fired), forgotten here; no host read. `decide` names the origin from them."""
        events, self._events = self._events, []
        if not events:
            return [], None
        device = events[0][2].device
        return [(name, kind) for name, kind, _ in events], torch.stack([flag.to(device) for _, _, flag in events])

    def decide(self, events: Sequence[tuple[str, str]], finite: Sequence[float | bool]) -> tuple[str, str] | None:
        """The origin from `take`'s firings and their flags read to the host (see `result`)."""
        if not events:
            return None
        bad_output: set[str] = set()
        first_bad_output = None
        for (name, kind), ok in zip(events, finite):
            if ok:
                continue
            if kind == "out":
                bad_output.add(name)
                first_bad_output = first_bad_output or name
            elif name not in bad_output:
                return name, "it received a finite gradient at its output and produced a non-finite one"
        if first_bad_output is None:
            return None
        if ROOT in bad_output or self.module is None:
            return (
                LOSS,
                "the gradient was already non-finite where backward started (the loss, or an operation after the "
                "model)",
            )
        return (
            first_bad_output,
            "the gradient reaching its output was non-finite: an operation outside the modules, after it, produced it",
        )

    def _recorder(self, name: str, kind: str) -> Callable[[Tensor], None]:
        def record(grad: Tensor) -> None:
            # One flag per firing, kept on the device: no host read inside backward.
            self._events.append((name, kind, torch.isfinite(grad).all()))

        return record

    def _forward_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if not torch.is_grad_enabled():
                return
            for tensor in _tensors(output):
                if tensor.requires_grad:
                    tensor.register_hook(self._recorder(name, "out"))
            for tensor in _tensors(args):
                if tensor.requires_grad and not isinstance(tensor, nn.Parameter):
                    tensor.register_hook(self._recorder(name, "in"))

        return hook


class NonfiniteWatch:
    """The tracker's answer to non-finite gradients: an alert on the logged step, then the
    locator armed to re-check the next step (logged out of turn), and the module it names.

    Memory: nothing until a non-finite step; then one `NonfiniteLocator` armed for one step.

    Example:
        >>> watch = NonfiniteWatch()
        >>> watch.attach(model, names, params)
        >>> alerts = watch.alerts(step, names, param_stats, skipped_since=0, last_logged=0)
        >>> watch.forces(step + 1)   # True after a non-finite step: log the re-checked step
    """

    def __init__(self) -> None:
        self.locator: NonfiniteLocator | None = None
        self.forced: set[int] = set()  # steps logged out of turn (after a non-finite step)

    def attach(self, module: nn.Module | None, names: Sequence[str], params: Sequence[Tensor]) -> None:
        """Learn the model whose gradients the locator will hook. Attached again (a new pipeline numbers its
        steps from 1), a re-check armed before is dropped with its hooks: they would record into a locator no
        one reads, for a step number of the old count. The first attach keeps a loaded ``forced``."""
        if self.locator is not None:
            self.detach()
        self.locator = NonfiniteLocator(module, names, params)

    def detach(self) -> None:
        """Forget the model: its hooks removed, no re-check pending."""
        if self.locator is not None:
            self.locator.disarm()
        self.locator = None
        self.forced.clear()

    def forces(self, step: int) -> bool:
        """Whether `step` is logged out of turn, to re-check a non-finite step."""
        return step in self.forced

    def take_recheck(self) -> tuple[list[tuple[str, str]], Tensor | None] | None:
        """At a re-checked step (its backward done): the armed hooks' firings and flags (`NonfiniteLocator.take`),
        the hooks removed; None when not armed. The flags ride with the step's host read."""
        locator = self.locator
        if locator is None or not locator.armed:
            return None
        taken = locator.take()
        locator.disarm()
        return taken

    def alerts(
        self, step: int, names: Sequence[str], params: dict[str, dict], *, skipped_since: int, last_logged: int,
        recheck: tuple[Sequence[tuple[str, str]], Sequence[float]] | None = None, next_step: int | None = None,
    ) -> list[Alert]:  # fmt: skip
        """The non-finite alert of logged step `step` (from its per-parameter NaN/Inf counts or norms, the
        re-check's hook firings and their read flags, or steps skipped since the last log), arming a
        re-check of `next_step` (default ``step + 1``: the first step whose backward has not run yet)."""
        locator = self.locator
        next_step = step + 1 if next_step is None else next_step
        bad = [name for name in names if _nonfinite(params[name])]
        if recheck is not None and locator is not None:
            found = locator.decide(*recheck)
            if found is not None:
                name, how = found
                message = (
                    f"step {step}: first module in backward order with a non-finite gradient is {name!r}: "
                    f"{how} (located by hooks)"
                )
                return [Alert(step, "nonfinite", name, message)]
            if not bad:
                logger.info(
                    "step %d: the non-finite gradient did not recur on the re-checked step; to locate it, replay the "
                    "offending batch with tracker.locate_nonfinite(lambda: loss_fn(model(x), y))", step,
                )  # fmt: skip
        if bad:
            # Parameters are registered in forward order, so the last one hit is the first in backward order.
            first = bad[-1]
            module = module_of(first)
            known = all(params[n]["nan"] is not None for n in bad)
            nan = sum(params[n]["nan"] for n in bad) if known else None
            inf = sum(params[n]["inf"] for n in bad) if known else None
            counted = f"{nan} NaN, {inf} Inf in" if known else "NaN/Inf counts not measured;"
            self._arm(next_step)
            message = (
                f"step {step}: non-finite gradient ({counted} {len(bad)} parameters); first in "
                f"backward order by parameter: {first!r}. Hooks re-check step {next_step} to name the module that "
                "produced it"
            )
            return [Alert(step, "nonfinite", module, message, float(nan + inf) if known else None)]
        if skipped_since:
            self._arm(next_step)
            message = (
                f"step {step}: {skipped_since} step(s) since step {last_logged} were skipped for a non-finite "
                f"gradient; hooks re-check step {next_step}"
            )
            return [Alert(step, "nonfinite", GLOBAL, message, float(skipped_since))]
        return []

    def replay(self, closure: Callable[[], Tensor], params: Sequence[Tensor], step: int) -> Alert | None:
        """Run `closure`'s forward and backward with the hooks armed; the alert naming the origin, or None."""
        if self.locator is None:
            raise RuntimeError(
                "the tracker is not attached to a model yet: pass it to GradientPipeline(tracker=...) "
                "or call tracker.track(model) first"
            )
        locator, was_armed = self.locator, self.locator.armed
        locator.arm()
        try:
            loss = closure()
            if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise TypeError(
                    "the closure must return the scalar loss of a forward pass with grad enabled, "
                    "e.g. lambda: loss_fn(model(x), y)"
                )
            torch.autograd.grad(loss.reshape(()), [p for p in params if p.requires_grad], allow_unused=True)
        finally:
            if not was_armed:
                locator.disarm()
        found = locator.result()
        if found is None:
            logger.info("locate_nonfinite: every gradient of the replayed batch is finite")
            return None
        name, how = found
        message = f"replay: first module in backward order with a non-finite gradient is {name!r}: {how}"
        return Alert(step, "nonfinite", name, message)

    def state_dict(self) -> dict[str, Any]:
        return {"forced": sorted(self.forced), "armed": bool(self.locator is not None and self.locator.armed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.forced = {int(s) for s in state["forced"]}
        if state["armed"] and self.locator is not None:
            self.locator.arm()

    def _arm(self, step: int) -> None:
        if self.locator is not None:
            self.locator.arm()
            self.forced.add(step)  # log the re-checked step, so its flags ride on a logging step's read


_VERSION = attrgetter("_version")


class GradRefs:
    """A logged step's gradients, with their versions, to count NaN/Inf on the host later.

    A logged step without counts on the device (not a detail step) may turn out non-finite when its
    record is read; its counts are then taken from the gradients if they are still the step's (alive
    and not modified in place). They are held strongly while the step's own gradients are alive anyway
    (until its ``after_step``, where its record is usually written), and weakly after `weaken`: a
    gradient the step drops is then freed. Strong first, because a thousand weak references per logged
    step are objects that Python's cyclic garbage collector counts and walks.

    Example:
        >>> refs = GradRefs(ctx.grads)              # at the logging step
        >>> refs.weaken()                           # if the record waits beyond the step
        >>> refs.counts(pre_clip_norms, norms)     # later: {index: (nan, inf)} of the non-finite rows
    """

    __slots__ = ("grads", "refs", "versions")

    def __init__(self, grads: Sequence[Tensor]) -> None:
        self.grads: list[Tensor] | None = list(grads)
        self.refs: list[weakref.ref] | None = None
        self.versions = list(map(_VERSION, grads))

    def weaken(self) -> None:
        """Hold the gradients weakly from now on (the step is over: they may be dropped)."""
        if self.grads is not None:
            self.refs, self.grads = list(map(weakref.ref, self.grads)), None

    def counts(self, pre: Sequence[float], norm: Sequence[float]) -> dict[int, tuple[int, int]]:
        """NaN/Inf counts of the parameters whose norms (before and after clipping, as read) are non-finite;
        one host read. Empty when all are finite, or when a gradient is gone or changed (counts unknown: null)."""
        finite = np.isfinite(np.asarray(pre, dtype=np.float64)) & np.isfinite(np.asarray(norm, dtype=np.float64))
        if finite.all():  # the healthy step: no look at each row
            return {}
        bad = np.flatnonzero(~finite).tolist()
        grads = [self.grads[i] for i in bad] if self.grads is not None else [self.refs[i]() for i in bad]
        if any(g is None or g._version != self.versions[i] for g, i in zip(grads, bad)):
            return {}
        counted = nonfinite_counts(False, grads, grads, range(len(bad)))
        return {bad[at]: value for at, value in counted.items()}


def nonfinite_counts(
    sharded: bool, grads: Sequence[Tensor], local: Sequence[Tensor], bad: Sequence[int]
) -> dict[int, tuple[int, int]]:
    """(NaN, Inf) counts of the gradients at `bad` (`grads`, their `local` pieces), over full
    parameters when `sharded` (norms are full-parameter values, so every rank has the same
    `bad` and joins the reduction)."""
    if not (sharded and bad):
        return _stats.nonfinite_counts(local, bad)
    counts = torch.stack([torch.stack([torch.isnan(local[i]).sum(), torch.isinf(local[i]).sum()]) for i in bad])
    counts = counts.double()
    total = _dtensor.reduce_sums(counts.T.reshape(-1), [grads[i] for i in bad] * 2).reshape(2, -1)
    return {i: (int(nan), int(inf)) for i, nan, inf in zip(bad, total[0].tolist(), total[1].tolist())}


def _nonfinite(entry: dict) -> bool:
    """Whether a parameter's record says non-finite: NaN/Inf counted, or (counts unknown) a non-finite norm."""
    if entry["nan"] is None:  # a record's non-finite norms are None
        pre, norm = entry["norm_pre_clip"], entry["norm"]
        return pre is None or norm is None or not (math.isfinite(pre) and math.isfinite(norm))
    return bool(entry["nan"] or entry["inf"])


def _tensors(value: object) -> list[Tensor]:
    """Tensors in an output or argument structure (one level of tuple/list/dict)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, Tensor)]
    if isinstance(value, dict):
        return [v for v in value.values() if isinstance(v, Tensor)]
    return []
