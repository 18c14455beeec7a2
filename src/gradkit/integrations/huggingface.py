"""gradkit inside Hugging Face ``transformers.Trainer``: tracking and clip stages as a callback.

pip install gradkit[hf]
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from gradkit.integrations._boundary import Boundary
from gradkit.integrations._optional import require

TrainerCallback = require("transformers", "TrainerCallback", integration="huggingface", extra="hf")

__all__ = ["GradkitCallback"]

logger = logging.getLogger("gradkit")


class GradkitCallback(TrainerCallback):
    """Track and clip the gradients a ``transformers.Trainer`` is about to apply.

    At each optimizer step (the ``on_pre_optimizer_step`` event) the gradients are
    accumulated over ``gradient_accumulation_steps``, averaged across processes and
    unscaled (the Trainer has computed its ``grad_norm`` by then). The callback then
    runs gradkit's boundary in the pipeline's order: global norm, clip stages,
    ``tracker.observe``; after ``optimizer.step`` (``on_optimizer_step``),
    ``tracker.after_step``.

    Clipping:
        * ``clip=`` replaces the Trainer's ``max_grad_norm``: the callback sets
          ``args.max_grad_norm = 0`` when training begins (logging that it did) and
          restores it at the end.
        * With a tracker and no ``clip=``, the callback takes the Trainer's own
          ``max_grad_norm`` clipping over and applies it with the same
          ``torch.nn.utils.clip_grad_norm_`` call, after the tracker has seen the
          pre-clip gradient: the weights are bit-identical to a run without the
          callback, and the tracker's ``norm_pre_clip`` is the Trainer's ``grad_norm``.

    Logs: the tracker writes its records to its own ``log_dir`` (``gradkit report``
    reads it). On each Trainer log, the latest tracker record also goes into the
    Trainer's logs as ``gradkit/grad_norm`` (global and per layer group),
    ``gradkit/clip_rate`` and ``gradkit/alerts``: into ``trainer.state.log_history``
    and to the ``report_to`` integrations that run after this callback. The Trainer
    puts its reporters before user callbacks; to feed them, move this one first:
    ``trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(GradkitCallback))``.

    Args:
        tracker: a ``gk.Tracker`` (logs every ``tracker.every`` optimizer steps), or None.
        clip: a gradkit clip stage or a list of them (e.g. ``gk.ZClip()``), or None. Training another model
            with the same callback (a hyperparameter search's next trial) starts the stages again from their
            state at construction; training the same model again keeps their state.

    Raises:
        TypeError: `tracker` lacks the tracker protocol, or `clip` holds something that
            is not a gradkit clip stage.

    Not covered: DeepSpeed and FSDP (their gradients are sharded or owned by the engine);
    the gradient noise scale (the Trainer does not expose a per-micro-batch gradient).

    Example:
        >>> tracker = gk.Tracker("runs/gpt2", every=10)
        >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[GradkitCallback(tracker, clip=gk.ZClip())])
        >>> trainer.train()        # then: gradkit report runs/gpt2
    """

    def __init__(self, tracker: Any = None, clip: Any = None) -> None:
        self.boundary = Boundary(tracker, clip)
        self._max_norm = 0.0  # the Trainer's max_grad_norm, taken over while training
        self._restore: tuple[Any, float] | None = None  # (the args, their max_grad_norm) while replaced

    @property
    def tracker(self) -> Any:
        return self.boundary.tracker

    @property
    def clip(self) -> list:
        return self.boundary.clip

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("GradkitCallback needs the model from the Trainer's on_train_begin event")
        self.boundary.attach(model)
        if self._restore is not None and self._restore[0] is args and args.max_grad_norm == 0.0:
            # A training that raised never reached on_train_end: the 0.0 is ours, and the value it replaced the
            # user's (a value the user set since is theirs, and kept).
            args.max_grad_norm = self._restore[1]
        max_norm = args.max_grad_norm or 0.0
        self._max_norm, self._restore = 0.0, None
        if max_norm > 0 and (self.boundary.clip or self.boundary.tracker is not None):
            self._restore = (args, args.max_grad_norm)
            args.max_grad_norm = 0.0  # the Trainer still computes (and logs) grad_norm, without clipping
            if self.boundary.clip:
                logger.info(
                    "GradkitCallback(clip=%s) replaces TrainingArguments.max_grad_norm=%s for this run",
                    [type(s).__name__ for s in self.boundary.clip], max_norm,
                )  # fmt: skip
            else:
                self._max_norm = float(max_norm)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        micro = args.gradient_accumulation_steps
        pre_clip = None
        if self._max_norm > 0:
            params, max_norm = self.boundary.params, self._max_norm

            def pre_clip() -> None:
                # The Trainer's own call (through accelerate), on the same parameters in the same order.
                torch.nn.utils.clip_grad_norm_(params, max_norm)

        self.boundary.before_step(step=state.global_step + 1, micro_steps=micro, items=micro * world, pre_clip=pre_clip)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.boundary.after_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        scalars = self.boundary.new_scalars()
        if not scalars:
            return
        if logs is not None:
            logs.update(scalars)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)

    def on_train_end(self, args, state, control, **kwargs):
        if self._restore is not None:
            args.max_grad_norm = self._restore[1]
            self._restore = None
        self.close()

    def close(self) -> None:
        """Flush the tracker's log (also done at the end of training)."""
        self.boundary.close()
