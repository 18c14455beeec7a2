"""The checks `GradientPipeline` runs on what it is given, before any state changes.

Its constructor's arguments (`arguments`), each micro-step's loss and window (`backward_call`),
the optimizer handed to `step` and `flush` (`optimizer`), and the parameters frozen at
construction that must stay frozen (`frozen`). Each raises with the value it got and the fix.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from torch import Tensor, nn

from gradkit import _checks
from gradkit.averaging import SyncControl
from gradkit.averaging.ema import EMA
from gradkit.clipping.stages import ClipStage
from gradkit.context import Attached

__all__ = ["OptimizerCheck", "arguments", "backward_call", "ema_model", "frozen", "optimizer"]


def arguments(
    model: object,
    accumulation_steps: object,
    clip: object,
    nonfinite: object,
    average: object,
    tracker: object,
    scaler: object,
    ema: object,
) -> tuple[int, list[ClipStage], str]:
    """(accumulation steps, clip stages as a list, the non-finite policy), checked with the other parts.

    The arguments are `GradientPipeline`'s, in this order; they are checked in it too.

    Raises:
        TypeError / ValueError: for the first argument that does not fit, naming it and the fix.

    Example:
        >>> steps, stages, nonfinite = arguments(model, 4, gk.ClipByGlobalNorm(1.0), "skip", None, None, None, None)
    """
    steps = _checks.positive_int(
        "accumulation_steps", accumulation_steps, "pass how many micro-batches make one optimizer step, e.g. 4"
    )
    stages = _stages(clip)
    policy = _checks.choice("nonfinite", nonfinite, ("skip", "raise"))
    _parts(model, average, tracker, scaler, ema)
    return steps, stages, policy


def backward_call(loss: object, *, micro_steps: int, accumulation_steps: int) -> None:
    """Refuse a loss that is not a scalar with grad, or a backward past the window's end.

    Raises:
        TypeError / ValueError: for the loss; RuntimeError: when the window is already full.

    Example:
        >>> backward_call(loss, micro_steps=pipe.window.micro_steps, accumulation_steps=pipe.accumulation_steps)
    """
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise TypeError(f"loss must be a scalar tensor, got {shape}; reduce it with .sum() or .mean() first")
    if not loss.requires_grad:
        raise ValueError(
            "loss does not require grad (computed under torch.no_grad(), or from frozen parameters); "
            "nothing to backpropagate: pass a loss computed with grad enabled from the parameters being trained"
        )
    if micro_steps >= accumulation_steps:
        raise RuntimeError(
            f"backward() was called {micro_steps + 1} times in a window of "
            f"accumulation_steps={accumulation_steps}; call pipe.step(optimizer) after each backward()"
        )


def frozen(params: Sequence[tuple[str, Tensor]]) -> None:
    """Refuse a parameter that was frozen when the pipeline was built and trains now: its
    gradient would reach the optimizer unaveraged, unnormalized and never reset.

    Raises:
        RuntimeError: naming the parameter.

    Example:
        >>> frozen(pipe._frozen)
    """
    for name, p in params:
        if p.requires_grad:
            raise RuntimeError(
                f"parameter {name!r} did not require grad when the GradientPipeline was built but requires it now; "
                "build a new GradientPipeline (and a new gk.Average) after unfreezing parameters, "
                "or freeze it again with requires_grad_(False)"
            )


def converted(attached: Attached) -> None:
    """Refuse a model converted in place since the pipeline was built (``model.double()``, ``model.cuda()``):
    the gradient grouping, the averaging buckets and any residual state are of the old dtype and device.
    One parameter is compared, once a window.

    Raises:
        RuntimeError: naming the parameter and the change.

    Example:
        >>> converted(pipe._attached)
    """
    change = attached.converted()
    if change is not None:
        raise RuntimeError(
            f"parameter {attached.names[0]!r} changed since the GradientPipeline was built ({change}); "
            "build a new GradientPipeline (and a new gk.Average) after converting the model "
            "(model.double(), model.to(device)), or convert it back"
        )


def optimizer(value: object) -> None:
    """Refuse anything but a torch optimizer (checked before the boundary touches a gradient).

    Raises:
        TypeError: naming what was passed.

    Example:
        >>> optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    """
    if not callable(getattr(value, "step", None)) or not hasattr(value, "param_groups"):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(value).__name__}; "
            "pass the optimizer of the model: pipe.step(optimizer)"
        )


def _parts(model: object, average: object, tracker: object, scaler: object, ema: object) -> None:
    # A class has the methods the duck checks below look for: refuse it by name first.
    for name, value, example in (
        ("tracker", tracker, "gk.Tracker('runs/exp1')"),
        ("scaler", scaler, 'torch.amp.GradScaler("cuda")'),
        ("ema", ema, "gk.EMA(model)"),
    ):
        if isinstance(value, type):
            raise TypeError(f"{name} must be an instance, got the class {value.__name__}; pass e.g. {name}={example}")
    if average is not None and not isinstance(average, SyncControl):
        raise TypeError(f"average must be gk.Average(...) or gk.ModelAverager(...), got {type(average).__name__}")
    if average is not None and isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "the model is wrapped in DistributedDataParallel, which already averages gradients; "
            "pass average=None to let DDP do it, or pass the unwrapped module to average with gradkit"
        )
    if tracker is not None and not all(callable(getattr(tracker, m, None)) for m in ("wants", "observe", "after_step")):
        raise TypeError(
            "tracker must have wants(step), observe(ctx, report) and after_step(ctx, report) (e.g. gk.Tracker), "
            f"got {type(tracker).__name__}"
        )
    scaler_methods = ("scale", "unscale_", "step", "update")
    if scaler is not None and not all(callable(getattr(scaler, m, None)) for m in scaler_methods):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if ema is not None and not callable(getattr(ema, "update", None)):
        raise TypeError(f"ema must be gk.EMA(model, ...) or None, got {type(ema).__name__}")


def _stages(clip: object) -> list[ClipStage]:
    stages = [] if clip is None else [clip] if isinstance(clip, ClipStage) else clip
    if not isinstance(stages, (list, tuple)) or not all(isinstance(s, ClipStage) for s in stages):
        raise TypeError(
            f"clip must be a clipping stage (e.g. gk.ClipByGlobalNorm(1.0)) or a list of them, got {clip!r}"
        )
    for index, stage in enumerate(stages):
        # One object twice would update its history twice a step and be saved twice.
        if any(stage is earlier for earlier in stages[:index]):
            raise ValueError(
                f"clip lists the same {type(stage).__name__} object twice (at {stages.index(stage)} and {index}); "
                "pass a separate stage for each place, e.g. [gk.AutoClip(), gk.AutoClip()]"
            )
    return list(stages)


def ema_model(ema: object, params: Sequence[Tensor]) -> None:
    """Refuse a ``gk.EMA`` of another model than the pipeline's: it would average weights nobody trains.

    Raises:
        ValueError: the EMA's model shares no parameter with the pipeline.

    Example:
        >>> ema_model(gk.EMA(model), list(model.parameters()))
    """
    if not isinstance(ema, EMA):
        return  # anything else with update(): its own business (its `.model` may be anything)
    model = ema.model
    trained = {id(p) for p in params}
    if not any(id(p) in trained for p in model.parameters()):
        raise ValueError(
            f"ema averages a {type(model).__name__} that holds none of the pipeline's parameters; "
            "pass gk.EMA(model) of the model the pipeline trains"
        )


class OptimizerCheck:
    """Refuses an optimizer that holds none of the pipeline's parameters (it would step
    nothing while the pipeline consumes the gradients); each optimizer is checked once."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self._ids = {id(p) for p in params}
        self._checked: weakref.WeakSet[object] = weakref.WeakSet()

    def __call__(self, value: object) -> None:
        optimizer(value)
        try:
            if value in self._checked:
                return
        except TypeError:  # not weak-referenceable: check every time
            pass
        held = (id(p) for group in value.param_groups for p in group.get("params", ()))  # type: ignore[attr-defined]
        if not any(i in self._ids for i in held):
            raise ValueError(
                f"optimizer {type(value).__name__} holds none of the pipeline's parameters; "
                "pass the optimizer built on the model the pipeline trains, e.g. torch.optim.AdamW(model.parameters())"
            )
        try:
            self._checked.add(value)
        except TypeError:
            pass
