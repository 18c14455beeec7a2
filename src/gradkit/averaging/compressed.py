"""Compressed averaging: which compressor `Average` and the DDP hook use, and loading its state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gradkit import _checks
from gradkit.compression.base import Compressor
from gradkit.compression.error_feedback import ErrorFeedback

__all__ = ["effective_compressor", "load_compressor_state"]


def load_compressor_state(
    owner: str, compressor: Compressor | None, state: dict[str, Any], known: Sequence[str] = (), required: Sequence[str] = ()
) -> None:
    """Load ``{"compressor": ...}`` (from ``owner.state_dict()``) into `compressor`; state kept under
    names other than `known` (or lacking one of `required`) is refused, unless no names are known yet."""
    _checks.state_keys(owner, state, {"compressor"})
    if compressor is not None:
        if known:
            compressor.check_state_names(owner, state["compressor"], known, required)
        compressor.load_state_dict(state["compressor"])
    elif state["compressor"]:
        raise ValueError(f"{owner}.load_state_dict: the state holds compressor state but this {owner} has no compressor; build it with the same compressor")


def effective_compressor(compressor: object, error_feedback: bool | None) -> Compressor | None:
    """The compressor Average uses: biased ones get error feedback unless told otherwise."""
    error_feedback = _checks.flag("error_feedback", error_feedback, "pass True, False, or None for the compressor's default", allow_none=True)
    if compressor is None:
        if error_feedback:
            raise ValueError("error_feedback=True needs a compressor; pass e.g. gk.Average(gk.TopK(0.01))")
        return None
    if not isinstance(compressor, Compressor):
        raise TypeError(f"compressor must be a gradkit compressor such as gk.TopK(0.01), got {compressor!r}")
    if error_feedback is None:
        error_feedback = compressor.biased and not compressor.keeps_residual
    if error_feedback and not isinstance(compressor, ErrorFeedback):
        return ErrorFeedback(compressor)
    return compressor

