"""Error feedback: keep what a compressor did not send and add it to the next gradient.

With residual memory, biased compressors such as top-k and sign converge like
SGD (Stich et al. 2018, "Sparsified SGD with Memory"; Karimireddy et al. 2019,
"Error Feedback Fixes SignSGD"). Nothing is lost: over any number of steps,
what was sent plus the final residual equals the sum of the inputs.
"""

from __future__ import annotations

from collections.abc import Callable
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
        residual_dtype: the dtype the residual is kept in; None (default) keeps it in the
            compressed tensor's dtype. ``torch.bfloat16`` halves the memory of float32
            gradients; the sum ``tensor + residual`` is still formed in the tensor's dtype,
            so only what stays behind is rounded (to bfloat16's 8 bits of mantissa).

    Memory: one residual as large as the compressed tensors, and nothing else between
    steps: 4 B/param for float32 gradients, 2 B/param with ``residual_dtype=torch.bfloat16``.
    A call with ``commit=True`` (and `absorb_`, `gk.Average`'s one-process step) updates the
    residual in place. A deferred call
    (``commit=False``, as `gk.Average` makes during backward) must keep the old residual
    until `commit()` or `discard()`, so the new one is a second buffer until then (freed at
    commit: the old one goes, the new one stays); at the step's peak that is twice the
    residual for the tensors compressed in the window. `compress_corrected_` (what `gk.Average`
    uses on a CPU) takes a buffer the caller already holds (the bucket) as the new residual and
    hands the old one's storage back at commit, so the step allocates nothing.

    Raises:
        TypeError: `compressor` is not a stateless compressor, or `residual_dtype` is not a
            floating dtype.

    Example:
        >>> ef = gk.ErrorFeedback(gk.TopK(0.01))
        >>> payload = ef.compress(grad, key="layer1.weight")
        >>> sent = ef.decompress(payload)
        >>> half = gk.Average(gk.ErrorFeedback(gk.TopK(0.01), residual_dtype=torch.bfloat16))
    """

    keyed = True
    keeps_residual = True

    def __init__(self, compressor: Compressor, *, residual_dtype: torch.dtype | None = None) -> None:
        if not isinstance(compressor, Compressor) or compressor.keyed:
            raise TypeError(
                f"ErrorFeedback wraps a stateless compressor such as gk.TopK(0.01), got {compressor!r}; "
                "DGC and PowerSGD keep their own residual: use them without ErrorFeedback"
            )
        floating = isinstance(residual_dtype, torch.dtype) and residual_dtype.is_floating_point
        if residual_dtype is not None and not floating:
            raise TypeError(
                f"residual_dtype must be a floating torch.dtype such as torch.bfloat16, or None for the "
                f"gradient's own dtype; got {residual_dtype!r}"
            )
        self.compressor = compressor.under_error_feedback()  # FP16/BF16 saturate here: the residual holds the rest
        self.residual_dtype = residual_dtype
        self.linear = compressor.linear
        self.sparse = compressor.sparse
        self.variable_size = compressor.variable_size
        self._residuals = KeyedState(["residual"])
        self._deferred: Deferred[tuple[Any, ...]] = Deferred(self._keep)

    def compress(self, tensor: Tensor, key: str | Layout | None = None, *, commit: bool = True) -> Payload:
        """Compress `tensor` plus the residual kept under `key`.

        Args:
            tensor: the tensor to compress (not modified).
            key: the parameter name (or a bucket layout) the residual belongs to.
            commit: store the new residual now (in place: no second buffer); with False it
                is kept aside until `commit()` (a step that turns out non-finite calls
                `discard()` and the residual stays as it was).

        Returns:
            The payload of ``tensor + residual``.
        """
        tensor = self._check_input(tensor)
        flat = tensor.reshape(-1)
        layout = layout_for(key, tensor)
        dtype = self.residual_dtype or flat.dtype
        state = self._residuals.get(layout, torch.empty(0, dtype=dtype, device=flat.device))
        residual = state["residual"]
        if commit and residual.dtype == flat.dtype and residual.device == flat.device:
            # In place: the residual becomes tensor + residual, is compressed (payloads never
            # alias their input), and keeps what was not sent. One buffer, one dense pass.
            payload = self.compressor.compress_residual_(residual, sum_of=(residual, flat))
        else:
            # The sum in the tensor's dtype (also under a narrower residual), in a new buffer:
            # the old residual must survive until commit() or discard().
            corrected = torch.empty_like(flat)
            payload = self.compressor.compress_residual_(corrected, sum_of=(flat, residual))
            if commit:
                residual.copy_(corrected)
            else:
                self._deferred.add(state, corrected if corrected.dtype == dtype else corrected.to(dtype), now=False)
        payload.shape = tensor.shape
        return payload

    def residual_for(self, key: str | Layout | None, like: Tensor) -> Tensor | None:
        """The residual kept under `key` (zeros at first use), for a caller that forms ``tensor +
        residual`` itself and passes it to `compress_corrected_`; None if the residual is not in
        like's dtype and device (a narrower residual: use `compress`).

        Args:
            key: the parameter name or bucket layout; like: a tensor of the compressed size.

        Returns:
            The residual (flat, like's size: read it, do not change it), or None.
        """
        flat = self._check_input(like).reshape(-1)
        dtype = self.residual_dtype or flat.dtype
        if dtype != flat.dtype:
            return None
        residual = self._residuals.get(layout_for(key, like), torch.empty(0, dtype=dtype, device=flat.device))
        residual = residual["residual"]
        return residual if residual.device == flat.device and residual.dtype == flat.dtype else None

    def compress_corrected_(
        self, corrected: Tensor, key: str | Layout | None, *, hand_back: Callable[[Tensor], None]
    ) -> Payload:
        """Compress `corrected` (``tensor + residual_for(key)``, formed by the caller) and leave in it,
        in place, what was not sent: the new residual, kept aside like ``compress(..., commit=False)``.

        `commit()` makes `corrected` itself the residual (no copy) and calls ``hand_back(old)`` with the
        old residual's tensor, which the caller may reuse as its buffer (it no longer belongs to this
        error feedback); `discard()` keeps the old residual, and `corrected` stays the caller's. So a
        distributed step needs no buffer of its own for the new residual, and between steps one
        residual per key remains.

        Args:
            corrected: a contiguous floating tensor, the sum of the tensor to compress and the residual
                (bit for bit what ``compress`` would form); changed in place.
            key: the parameter name or bucket layout, as given to `residual_for`.
            hand_back: called at commit with the old residual's tensor.

        Returns:
            The payload of `corrected` (as passed).

        Raises:
            ValueError: `corrected` is not contiguous.

        Example:
            >>> residual = ef.residual_for(layout, bucket)
            >>> torch.add(grads, residual, out=bucket)
            >>> payload = ef.compress_corrected_(bucket, layout, hand_back=lambda old: buffers.append(old))
            >>> ef.commit()  # the bucket's tensor is the residual now; `old` was handed back
        """
        corrected = self._check_input(corrected)
        if not corrected.is_contiguous():
            raise ValueError(
                "ErrorFeedback.compress_corrected_ needs a contiguous tensor (it keeps it as the residual); "
                "pass tensor.contiguous()"
            )
        layout = layout_for(key, corrected)
        state = self._residuals.get(layout, corrected)
        payload = self.compressor.compress_residual_(corrected.view(-1))
        self._deferred.add(state, corrected.view(-1), hand_back, now=False)
        payload.shape = corrected.shape
        return payload

    def absorb_(
        self,
        tensor: Tensor,
        key: str | None = None,
        *,
        scale: Tensor,
        keep: Tensor,
        write_back: bool | Tensor = False,
    ) -> Payload:
        """Move ``tensor * scale`` into the residual, compress it, and keep what was not sent.

        The one-process step: the residual is updated at once and in place (no second buffer,
        no temporary as large as the tensor) and `tensor` (the gradient) is left zeroed, or,
        with `write_back`, holding what is sent (the selective update; `TopK` writes it in
        its selecting pass on a CPU, while each chunk is in cache, instead of a scattered
        write after it). Where `keep` is False the call changes no state: the residual stays
        as it was and the payload's values are zeros (a non-finite gradient, whose step is
        skipped; its non-finite entries count as 0). With `keep` True the caller has checked
        that ``tensor * scale`` is finite.

        Args:
            tensor: a contiguous floating tensor; its values are consumed (zeroed, or replaced
                by what is sent).
            key: the parameter name its residual is kept under.
            scale: a 0-d tensor in tensor's dtype, multiplying it (the window's mean).
            keep: a 0-d bool tensor: False leaves the residual untouched (no host read off a CPU).
            write_back: True writes what is sent into `tensor`; a 0-d tensor in tensor's dtype
                writes it times that factor (e.g. a loss scale); False leaves `tensor` zeroed.

        Returns:
            The payload of ``tensor * scale + residual``.

        Raises:
            ValueError: `tensor` is not contiguous (it could not be zeroed in place).
            TypeError: `write_back` is neither a bool nor a 0-d tensor.
        """
        tensor = self._check_input(tensor)
        if not tensor.is_contiguous():
            raise ValueError(
                "ErrorFeedback.absorb_ needs a contiguous tensor (it zeroes it in place); pass tensor.contiguous()"
            )
        factor = _write_factor(write_back, tensor)
        flat = tensor.view(-1)
        layout = layout_for(key, tensor)
        dtype = self.residual_dtype or flat.dtype
        residual = self._residuals.get(layout, torch.empty(0, dtype=dtype, device=flat.device))["residual"]
        scale = torch.where(keep, scale, torch.zeros((), dtype=scale.dtype, device=scale.device))
        if residual.dtype == flat.dtype and residual.device == flat.device:
            # One call: add, select, and keep the rest (one pass on a CPU for TopK).
            payload = self.compressor.absorb_sum_(residual, flat, scale, keep, write_back=factor)
        else:
            # A narrower residual: the sum is formed in the tensor's dtype, in the tensor itself.
            payload = self.compressor.absorb_into_(flat, residual, scale, keep, write_back=factor)
        payload.shape = tensor.shape
        return payload

    def _keep(self, state: dict[str, Tensor], new: Tensor, hand_back: Callable[[Tensor], None] | None = None) -> None:
        # The old residual is dropped here (or handed back to the caller whose buffer became the
        # new one): between steps only one buffer per key remains.
        old, state["residual"] = state["residual"], new
        if hand_back is not None:
            hand_back(old)

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


def _write_factor(write_back: object, tensor: Tensor) -> Tensor | None:
    """`ErrorFeedback.absorb_`'s `write_back` as a 0-d factor in tensor's dtype (None: no write)."""
    if isinstance(write_back, bool):
        return torch.ones((), dtype=tensor.dtype, device=tensor.device) if write_back else None
    if isinstance(write_back, Tensor) and write_back.dim() == 0:
        return write_back.to(dtype=tensor.dtype, device=tensor.device)
    raise TypeError(
        "write_back must be True, False, or a 0-d tensor (a factor for what is written back); "
        f"got {type(write_back).__name__} {write_back!r}"
    )
