"""What one optimizer step reports: `StepReport`, and the `NoiseSample` it may carry.

The pipeline builds a report at each boundary (``pipe.last``), the integrations
build one at each trainer step, and the tracker reads them. This module sits on
the ground floor (it imports nothing of gradkit), so every one of those can
import it without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["NoiseSample", "StepReport"]


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

    Built by gradkit (``pipe.last``), with keywords only.

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
    items: Tensor
    total_norm: Tensor
    norm_after: Tensor
    clip_coef: Tensor
    skipped: Tensor
    bytes_sent: int = 0
    dense_bytes: int = 0
    noise: NoiseSample | None = None
