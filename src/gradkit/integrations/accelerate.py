"""gradkit in a Hugging Face Accelerate loop: clip stages and a tracker between ``backward`` and ``step``.

pip install gradkit[accelerate]
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gradkit.integrations._boundary import Boundary
from gradkit.integrations._optional import require
from gradkit.step_report import StepReport

Accelerator = require("accelerate", "Accelerator", integration="accelerate", extra="accelerate")

__all__ = ["GradkitStep"]


class GradkitStep:
    """The gradkit boundary of an Accelerate loop: unscale, norm, clip stages, ``tracker.observe``.

    Call `before_step` after ``accelerator.backward(loss)`` and before ``optimizer.step()``;
    it does work only when ``accelerator.sync_gradients`` (the last micro-batch of an
    ``accelerator.accumulate(model)`` window). Call `after_step` after ``optimizer.step()``.

    Args:
        accelerator: the ``accelerate.Accelerator`` of the loop.
        model: the prepared (or plain) model.
        tracker: a ``gk.Tracker``, or None.
        clip: a gradkit clip stage or a list of them, or None.

    Raises:
        TypeError: for an accelerator, tracker or clip stage of the wrong kind.

    Example:
        >>> step = GradkitStep(accelerator, model, tracker=gk.Tracker("runs/x"), clip=gk.ZClip())
        >>> with accelerator.accumulate(model):
        ...     accelerator.backward(loss)
        ...     step.before_step()
        ...     optimizer.step(); step.after_step(); optimizer.zero_grad()
    """

    def __init__(self, accelerator: Accelerator, model: nn.Module, *, tracker: Any = None, clip: Any = None) -> None:
        if not isinstance(accelerator, Accelerator):
            raise TypeError(f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}")
        self.boundary = Boundary(tracker, clip)
        self.boundary.attach(accelerator.unwrap_model(model))
        self.accelerator = accelerator
        self.steps = 0
        self._pending = False

    def before_step(self) -> StepReport | None:
        """On a sync step: unscale (mixed precision), then norm, clip stages and tracker; else None."""
        if not self.accelerator.sync_gradients:
            return None
        self.accelerator.unscale_gradients()  # once per step; the optimizer's step knows it was done
        self.steps += 1
        micro = self.accelerator.gradient_accumulation_steps
        self._pending = True
        return self.boundary.before_step(
            step=self.steps, micro_steps=micro, items=micro * self.accelerator.num_processes
        )

    def after_step(self) -> None:
        """After ``optimizer.step()``: completes the tracker's logged step (a no-op between sync steps)."""
        if self._pending:
            self._pending = False
            self.boundary.after_step()

    def close(self) -> None:
        """Flush the tracker's log."""
        self.boundary.close()
