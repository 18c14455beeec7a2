"""Error feedback: keep what a compressor did not send and add it to the next gradient.

With residual memory, biased compressors such as top-k and sign converge like
SGD (Stich et al. 2018, "Sparsified SGD with Memory"; Karimireddy et al. 2019,
"Error Feedback Fixes SignSGD"). Nothing is lost: over any number of steps,
what was sent plus the final residual equals the sum of the inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradkit import _checks
from gradkit.compression.base import Compressor, Deferred, Payload
from gradkit.compression.keyed_state import KeyedState, Layout, check_named_tensors, layout_for, named_fields

__all__ = ["ErrorFeedback"]


class ErrorFeedback(Compressor):
    """Wrap a compressor with a residual memory per key (parameter name).

    ``compress(tensor, key)`` compresses ``tensor + residual[key]`` and keeps
    ``(tensor + residual) - decompress(payload)`` as the new residual.

    Args:
        compressor: the compressor to wrap.

    Memory: one residual as large as the compressed tensors.

    Example:
        >>> ef = gk.ErrorFeedback(gk.TopK(0.01))
        >>> payload = ef.compress(grad, key="layer1.weight")
        >>> sent = ef.decompress(payload)
    """

    keyed = True
    keeps_residual = True

    def __init__(self, compressor: Compressor) -> None:
        if not isinstance(compressor, Compressor) or compressor.keyed:
            raise TypeError(
                f"ErrorFeedback wraps a stateless compressor such as gk.TopK(0.01), got {compressor!r}; "
                "DGC and PowerSGD keep their own residual: use them without ErrorFeedback"
            )
        self.compressor = compressor
        self.linear = compressor.linear
        self.sparse = compressor.sparse
        self.variable_size = compressor.variable_size
        self._residuals = KeyedState(["residual"])
        # A second buffer per key takes `tensor + residual` and becomes the residual on
        # commit (a swap): no new tensor and no copy per step.
        self._spares: dict[Layout, Tensor] = {}
        self._deferred: Deferred[tuple[dict[str, Tensor], Layout]] = Deferred(self._keep)

    def compress(self, tensor: Tensor, key: str | Layout | None = None, *, commit: bool = True) -> Payload:
        """Compress `tensor` plus the residual kept under `key`.

        Args:
            tensor: the tensor to compress (not modified).
            key: the parameter name (or a bucket layout) the residual belongs to.
            commit: store the new residual now; with False it is kept aside
                until `commit()` (a step that turns out non-finite calls
                `discard()` and the residual stays as it was).
        """
        tensor = self._check_input(tensor)
        layout = layout_for(key, tensor)
        state = self._residuals.get(layout, tensor.reshape(-1))
        residual = state["residual"]
        spare = self._spares.get(layout)
        if spare is None:  # a new layout: drop the spares of layouts it replaced (DDP's rebuild)
            for known in [known for known in self._spares if known not in self._residuals]:
                del self._spares[known]
        if spare is None or spare.shape != residual.shape or spare.dtype != residual.dtype or spare.device != residual.device:
            spare = self._spares[layout] = torch.empty_like(residual)
        corrected = torch.add(tensor.reshape(-1), residual, out=spare)
        payload = self.compressor.compress(corrected)
        self.compressor.residual_(corrected, payload)  # in place: the spare now holds the new residual
        payload.shape = tensor.shape
        self._deferred.add(state, layout, now=commit)
        return payload

    def _keep(self, state: dict[str, Tensor], layout: Layout) -> None:
        # The spare holds the new residual: swap it in, the old residual becomes the spare.
        state["residual"], self._spares[layout] = self._spares[layout], state["residual"]

    def decompress(self, payload: Payload) -> Tensor:
        return self.compressor.decompress(payload)

    def residual(self, key: str | None = None) -> Tensor | None:
        """The residual kept for a single-tensor `key` (None if nothing was kept)."""
        return self._residuals.state_dict()["residual"].get("" if key is None else key)

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": self._residuals.state_dict()["residual"], "compressor": self.compressor.state_dict()}

    def named_state(self, state: object) -> list[tuple[str, Any, bool]]:
        inner = state.get("compressor") if isinstance(state, dict) else None
        return named_fields(state, residuals=True) + self.compressor.named_state(inner)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _checks.state_keys("ErrorFeedback", state, {"residuals", "compressor"})
        check_named_tensors("ErrorFeedback", "residuals", state["residuals"])
        before = self.compressor.state_dict()
        self.compressor.load_state_dict(state["compressor"])
        try:
            self._residuals.load_state_dict({"residual": state["residuals"]}, "ErrorFeedback")
        except Exception:
            self.compressor.load_state_dict(before)
            raise
        self.discard()  # a deferred residual belongs to the state just replaced
