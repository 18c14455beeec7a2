"""The checks `GradientPipeline.load_state_dict` runs on a checkpoint before it loads anything.

A pipeline's state is its window in progress (counters, item count and partial
gradients by parameter name) plus the states of its parts (clip stages, sync,
scaler, tracker). Every value of the window is checked here first, so that a bad
one raises before any part changes. `save` and `load` hold the bodies of the pipeline's
``state_dict`` and ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from gradkit import _checks, _stateful
from gradkit.accumulation import check_num_items

__all__ = ["KEYS", "SavedWindow", "check_window", "load", "save"]

#: the keys of `GradientPipeline.state_dict()`
KEYS = {"steps", "skipped_steps", "micro_steps", "items", "grads", "clip", "scaler", "average", "tracker"}

_FIX = "pass the state from GradientPipeline.state_dict()"


@dataclass(kw_only=True)
class SavedWindow:
    """The checked counters and window of a pipeline state."""

    steps: int
    skipped_steps: int
    micro_steps: int
    items: int | Tensor | None
    grads: dict[str, Tensor]


def check_window(
    state: Any, *, names: Sequence[str], params: Sequence[Tensor], clip_stages: int, accumulation_steps: int
) -> SavedWindow:
    """The window of `state` (a `GradientPipeline.state_dict()`), checked against the pipeline loading it.

    Raises:
        ValueError / TypeError: missing or unexpected keys, bad counters, gradients of unknown
            parameters or shapes, a clip stage count or window length that does not fit.

    Example:
        >>> window = check_window(state, names=pipe.names, params=pipe.params, clip_stages=1, accumulation_steps=4)
    """
    _checks.state_keys("GradientPipeline", state, KEYS)
    steps = _checks.non_negative_int("steps", state["steps"], _FIX)
    skipped_steps = _checks.non_negative_int("skipped_steps", state["skipped_steps"], _FIX)
    grads = _check_grads(state["grads"], names, params)
    clip = state["clip"]
    if not isinstance(clip, list) or len(clip) != clip_stages:
        raise ValueError(
            f"GradientPipeline.load_state_dict: the state has {len(clip) if isinstance(clip, list) else clip!r} "
            f"clip stage states, this pipeline has {clip_stages} stages; build the pipeline with the same clip stages"
        )
    micro_steps = _checks.non_negative_int("micro_steps", state["micro_steps"], _FIX)
    if micro_steps >= accumulation_steps:
        raise ValueError(
            f"micro_steps={micro_steps} does not fit accumulation_steps={accumulation_steps}; "
            "build the pipeline with the accumulation_steps it was saved with"
        )
    items = state["items"]
    if not (items is None or isinstance(items, Tensor) or (isinstance(items, int) and not isinstance(items, bool))):
        raise TypeError(
            f"GradientPipeline.load_state_dict: 'items' must be None, an int or a tensor, got {type(items).__name__}"
        )
    if items is not None:
        try:
            items = check_num_items(items)
        except (TypeError, ValueError) as error:
            raise type(error)(f"GradientPipeline.load_state_dict: 'items': {error}") from None
    return SavedWindow(steps=steps, skipped_steps=skipped_steps, micro_steps=micro_steps, items=items, grads=grads)


def _check_grads(grads: object, names: Sequence[str], params: Sequence[Tensor]) -> dict[str, Tensor]:
    if not isinstance(grads, dict):
        raise TypeError(
            f"GradientPipeline.load_state_dict: 'grads' must be a dict of tensors, got {type(grads).__name__}"
        )
    shapes = {n: p.shape for n, p in zip(names, params)}
    for name, grad in grads.items():
        if name not in shapes:
            raise ValueError(
                f"GradientPipeline.load_state_dict: the state has a gradient for unknown parameter {name!r}; "
                "load it into the model it was saved from"
            )
        if not isinstance(grad, Tensor) or grad.shape != shapes[name]:
            got = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
            raise ValueError(
                f"GradientPipeline.load_state_dict: gradient {name!r} has shape {got}, "
                f"the parameter has {tuple(shapes[name])}"
            )
    return grads


def save(pipe: Any) -> dict[str, Any]:
    """The state of `pipe` (a `GradientPipeline`): its window in progress and its parts' states."""
    items, pairs = pipe.window.items, zip(pipe.names, pipe.params) if pipe.window.micro_steps else ()
    return {
        "steps": pipe.steps,
        "skipped_steps": pipe.skipped_steps,
        "micro_steps": pipe.window.micro_steps,
        "items": items.clone() if isinstance(items, Tensor) else items,
        "grads": {n: p.grad.detach().clone() for n, p in pairs if p.grad is not None},
        "clip": [stage.state_dict() for stage in pipe.clip],
        "scaler": pipe.scaler.state_dict() if pipe.scaler is not None else None,
        "average": pipe.sync.state_dict(),
        "tracker": pipe.tracker.state_dict() if callable(getattr(pipe.tracker, "state_dict", None)) else None,
    }


def load(pipe: Any, state: Any) -> None:
    """Restore `state` into `pipe` (a `GradientPipeline`), all or nothing."""
    # Every value is checked before anything is loaded: a bad one changes nothing.
    saved = check_window(
        state,
        names=pipe.names,
        params=pipe.params,
        clip_stages=len(pipe.clip),
        accumulation_steps=pipe.accumulation_steps,
    )
    parts = list(zip(pipe.clip, state["clip"])) + [(pipe.sync, state["average"])]
    if pipe.scaler is not None and state["scaler"] is not None:
        parts.append((pipe.scaler, state["scaler"]))
    if state["tracker"] is not None and callable(getattr(pipe.tracker, "load_state_dict", None)):
        parts.append((pipe.tracker, state["tracker"]))
    _stateful.load_all_or_nothing(parts)
    pipe.steps, pipe.skipped_steps = saved.steps, saved.skipped_steps
    pipe.window.micro_steps, pipe.window.items = saved.micro_steps, saved.items
    by_name = dict(zip(pipe.names, pipe.params))
    for p in pipe.params:
        p.grad = None
    for name, grad in saved.grads.items():
        by_name[name].grad = grad.to(by_name[name]).clone()
