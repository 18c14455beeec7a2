"""The base of every configurable, stateful gradkit object (clip stages, compressors), and loading
several such objects all or nothing."""

from __future__ import annotations

from typing import Any

from gradkit import _checks

__all__ = ["Stateful", "load_all_or_nothing"]


class Stateful:
    """Configuration in public attributes, state in ``state_dict()`` (empty by default)."""

    def state_dict(self) -> dict[str, Any]:
        """The state as plain tensors and numbers (empty for stateless objects)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (here: check that it holds no unknown keys)."""
        _checks.state_keys(type(self).__name__, state, set(self.state_dict().keys()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def load_all_or_nothing(parts: list[tuple[Any, dict[str, Any]]]) -> None:
    """Load each (object, state) pair; if one fails, put every object back as it was and re-raise.

    Example:
        >>> load_all_or_nothing([(stage, state["clip"][0]), (scaler, state["scaler"])])
    """
    before = [obj.state_dict() for obj, _ in parts]
    try:
        for obj, obj_state in parts:
            obj.load_state_dict(obj_state)
    except Exception:
        for (obj, _), obj_state in zip(parts, before):
            obj.load_state_dict(obj_state)
        raise
