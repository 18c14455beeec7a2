"""gradkit inside ``lightning.Trainer``: tracking and clip stages as a callback.

pip install gradkit[lightning]
"""

from __future__ import annotations

from typing import Any

from gradkit.integrations._boundary import Boundary
from gradkit.integrations._optional import require

Callback = require("lightning.pytorch", "Callback", integration="lightning", extra="lightning")

__all__ = ["GradkitCallback"]


class GradkitCallback(Callback):
    """Track and clip the gradients a ``lightning.Trainer`` is about to apply.

    At each optimizer step (``on_before_optimizer_step``) the gradients are
    accumulated over ``accumulate_grad_batches``, averaged by the strategy (DDP)
    and unscaled by the precision plugin. The callback runs gradkit's boundary in
    the pipeline's order: global norm, clip stages, ``tracker.observe``; after the
    optimizer has stepped (``on_train_batch_end``), ``tracker.after_step``.
    Lightning's own clipping (``gradient_clip_val``) runs after this hook, so the
    tracker sees the pre-clip gradient either way.

    On logging steps the latest tracker record goes to ``pl_module.log`` (rank 0):
    ``gradkit/grad_norm`` (global and per layer group), ``gradkit/clip_rate`` and
    ``gradkit/alerts``, so they reach the Trainer's loggers.

    Args:
        tracker: a ``gk.Tracker``, or None.
        clip: a gradkit clip stage or a list of them (e.g. ``gk.ZClip()``), or None. Training another model
            with the same callback (a hyperparameter search's next trial) starts the stages again from their
            state at construction; training the same model again keeps their state.

    Raises:
        TypeError: `tracker` lacks the tracker protocol, or `clip` holds something
            that is not a gradkit clip stage.
        ValueError: at fit start, when both `clip` and the Trainer's
            ``gradient_clip_val`` are set (the gradient would be clipped twice).

    Not covered: manual optimization, several optimizers, FSDP/DeepSpeed strategies.

    Example:
        >>> trainer = L.Trainer(accumulate_grad_batches=2,
        ...                     callbacks=[GradkitCallback(gk.Tracker("runs/x"), clip=gk.ZClip())])
        >>> trainer.fit(module, loader)        # then: gradkit report runs/x
    """

    def __init__(self, tracker: Any = None, clip: Any = None) -> None:
        self.boundary = Boundary(tracker, clip)
        self._stepped = False

    @property
    def tracker(self) -> Any:
        return self.boundary.tracker

    @property
    def clip(self) -> list:
        return self.boundary.clip

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.boundary.clip and trainer.gradient_clip_val:
            raise ValueError(
                f"both GradkitCallback(clip=...) and Trainer(gradient_clip_val={trainer.gradient_clip_val}) clip the "
                "gradient; pass gradient_clip_val=None to the Trainer, or drop clip= from the callback"
            )
        if not pl_module.automatic_optimization:
            raise ValueError("GradkitCallback needs automatic optimization; with manual optimization use the pipeline")
        self.boundary.attach(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        world = trainer.world_size
        micro = trainer.accumulate_grad_batches
        self.boundary.before_step(step=trainer.global_step + 1, micro_steps=micro, items=micro * world)
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._stepped:
            return
        self._stepped = False
        self.boundary.after_step()
        scalars = self.boundary.new_scalars()
        if scalars:
            pl_module.log_dict(scalars, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.close()

    def close(self) -> None:
        """Flush the tracker's log (also done at the end of fit)."""
        self.boundary.close()
