"""A `Tracker` used by hand, without a `GradientPipeline`: ``track()`` after ``backward()``, and
``locate_nonfinite()`` to replay a batch whose gradient turned non-finite.

These are the two entry points of a training loop that owns its own step; the pipeline's
protocol (``attach``, ``observe``, ``after_step``) and the tracker's state are in tracker.py.
`Tracker` inherits them from `ManualTracking`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from gradkit.context import Attached, same_params
from gradkit.tracking import record as _record

__all__ = ["ManualTracking"]


class ManualTracking:
    """`Tracker.track` and `Tracker.locate_nonfinite` (a part of `Tracker`, not used alone)."""

    def track(self, model: nn.Module | Sequence[tuple[str, Tensor]] | None = None, *, items: int | None = None) -> None:
        """Observe the gradients in ``p.grad`` after ``backward()``, without a pipeline.

        Call it once per optimizer step, before ``optimizer.step()``. Without
        clip stages, the norms before and after clipping are the same and no
        noise scale is measured. The update ratio of a logged step is completed
        by ``after_step()`` (call it after ``optimizer.step()``), or else at the
        next `track` call.

        Args:
            model: the module (or ``named_parameters()`` pairs); needed on the
                first call, optional after (the same model is assumed). Another
                model, or other trainable parameters, is followed as `attach`
                follows it (a warning, and a new run header in the same log);
                the same module with a layer frozen or unfrozen goes on
                counting its steps, another model starts again at step 1.
            items: how many items the step's batch held, for the log.

        Raises:
            RuntimeError: no model on the first call.

        Example:
            >>> loss.backward(); tracker.track(model); optimizer.step(); tracker.after_step()
        """
        if model is not None:
            module, names, params = _record.trainable(model)
            if self._names is None:
                self.attach(module, names, params)
            elif not same_params(self._names, self._params, names, params):
                # Another model (even one with the same names) is followed as a pipeline's would be: a new run. The
                # same module with a layer frozen or unfrozen is the same loop going on: its steps go on too.
                same_module = module is not None and self._module is not None and self._module() is module
                step, counters = self.step, self._counters
                self.attach(module, names, params)
                if same_module:
                    self.step, self._counters = step, counters
        elif self._names is None:
            raise RuntimeError("track() needs the model on its first call: tracker.track(model)")
        step = self.step + 1
        if not self.wants(step):
            self.step = step
            self._counters.since += 1
            self._drain()
            return
        if self._attached.moved():  # converted in place since (model.double(), .cuda()): group its gradients anew
            self._attached = Attached(self._attached.names, self._attached.params)
        ctx = self._attached.context()  # one list for every step: its element counts and layout are kept
        self.observe(ctx, _record.standalone_report(ctx, step, items))

    def locate_nonfinite(self, closure: Callable[[], Tensor]) -> str | None:
        """Replay one batch with hooks and name the first module, in backward order, making the gradient non-finite.

        Use it when a non-finite step did not recur on the next step (the
        tracker re-checks that one by itself): rerun the offending batch.
        Gradients are computed with ``torch.autograd.grad``, so ``p.grad`` is
        left untouched.

        Args:
            closure: runs the forward pass and returns the scalar loss, e.g.
                ``lambda: loss_fn(model(x), y)``.

        Returns:
            The module name ("(loss)" when the loss itself was non-finite), or
            None when every gradient was finite. A found origin is also an alert.

        Example:
            >>> tracker.locate_nonfinite(lambda: F.cross_entropy(model(x_bad), y_bad))
            '4.attn'
        """
        self.flush()  # the pending records' alerts (and hooks) first
        alert = self._nonfinite.replay(closure, self._params, self.step)
        if alert is None:
            return None
        self._sink.alert(alert)
        return alert.name
