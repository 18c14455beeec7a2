"""What one optimizer step reports: `StepReport`, and the `NoiseSample` it may carry.

The pipeline builds a report at each boundary (``pipe.last``), the integrations
build one at each trainer step, and the tracker reads them. This module sits on
the ground floor (it imports nothing of gradkit), so every one of those can
import it without importing the others.

A report's derived values (the item count as a tensor, the norm after clipping, the
clip coefficient, a host skip decision as a tensor) may be handed over as `Later`:
the operations that make them then run on the first read, and a step whose report
nobody reads makes none of them (on a GPU, each would be a kernel launch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

__all__ = ["Later", "NoiseSample", "StepReport"]


class Later:
    """A value computed on its first use, ``fn(*args)``; arguments that are `Later` are resolved first.

    Only for values made from tensors that nobody changes afterwards (a step's norms,
    coefficients, counts), so that computing them later gives what computing them at
    once would have given. The result is kept: one computation, however many reads.
    It runs without autograd and outside inference mode, as the step's own work does.

    Args:
        fn: the computation.
        *args: its arguments.

    Example:
        >>> coef = Later(torch.div, norm_after, total_norm)
        >>> coef.value()   # computed now, kept for the next call
    """

    __slots__ = ("_fn", "_args", "_value")

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._fn, self._args = fn, args
        self._value: Any = _UNSET

    def value(self) -> Any:
        """The value, computed on the first call."""
        if self._value is _UNSET:
            args = [arg.value() if isinstance(arg, Later) else arg for arg in self._args]
            with torch.inference_mode(False), torch.no_grad():
                self._value = self._fn(*args)
            self._fn, self._args = None, ()  # the inputs are no longer needed
        return self._value


_UNSET: Any = object()


class _Resolved:
    """A dataclass field that may be set to a `Later` and reads as its value (resolved once, then kept)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            raise AttributeError(self.name)  # a field without a default, for the dataclass
        value = obj.__dict__[self.name]
        if isinstance(value, Later):
            value = obj.__dict__[self.name] = value.value()
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = value


@dataclass(kw_only=True)
class NoiseSample:
    """Squared norms of one gradient at two batch sizes, for the gradient noise scale
    (McCandlish et al. 2018). Batch sizes are in items, or in micro-batches in mean mode.

    Attributes:
        small_sq: squared L2 norm of the gradient of the small batch (a mean, not a sum).
        small_batch: the small batch's size.
        big_sq: squared L2 norm of the gradient of the big batch.
        big_batch: the big batch's size.

    Example:
        >>> sample = pipe.last.noise        # None on windows the tracker does not measure
        >>> tracker.noise.update(sample)
    """

    small_sq: Tensor
    small_batch: Tensor
    big_sq: Tensor
    big_batch: Tensor


@dataclass(kw_only=True)
class StepReport:
    """What happened at one optimizer step; values are tensors, read them when you log.

    Built by gradkit (``pipe.last``), with keywords only. `items`, `norm_after`, `clip_coef`
    and `skipped` may be given as `Later`; they read as tensors all the same, computed on
    the first read (a copy or a pickle of the report holds the values).

    Attributes:
        step: optimizer steps finished so far, skipped ones included.
        micro_steps: backward calls in the window.
        items: items in the window summed over processes (micro-batches × processes in mean mode).
        total_norm: global L2 norm of the normalized, unscaled gradient before clipping.
        norm_after: global L2 norm after the clip stages (equal to `total_norm` without stages).
        clip_coef: norm_after / total_norm (1 when nothing was clipped).
        skipped: True when the step was skipped for a non-finite gradient.
        bytes_sent: payload bytes this process sent to average the window (0 on one process).
        dense_bytes: what the same gradients take uncompressed; ``dense_bytes / bytes_sent``
            is the compression ratio.
        noise: gradient norms at two batch sizes, on windows the tracker measures (else None).

    Example:
        >>> if pipe.step(optimizer) and step % 100 == 0:
        ...     print(float(pipe.last.total_norm), float(pipe.last.clip_coef))
    """

    step: int
    micro_steps: int
    items: Tensor = _Resolved()  # type: ignore[assignment]
    total_norm: Tensor
    norm_after: Tensor = _Resolved()  # type: ignore[assignment]
    clip_coef: Tensor = _Resolved()  # type: ignore[assignment]
    skipped: Tensor = _Resolved()  # type: ignore[assignment]
    bytes_sent: int = 0
    dense_bytes: int = 0
    noise: NoiseSample | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles hold values, not the computations that make them.
        return {field.name: getattr(self, field.name) for field in fields(self)}
