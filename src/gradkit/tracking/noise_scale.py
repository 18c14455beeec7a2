"""The gradient noise scale B_simple and the batch-size advice it gives.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch
Training": the simple noise scale ``B_simple = tr(Σ) / |G|²`` (Σ: the
per-example gradient covariance, G: the true gradient) predicts the critical
batch size, below which a larger batch cuts the number of steps almost
proportionally and above which the returns diminish.

Both quantities come from the squared norm of one gradient measured at two
batch sizes b < B (the pipeline provides them on measured windows: the first
micro-batch against the whole window, or this rank against the all-reduced
gradient)::

    |G|²  ≈ (B |G_B|² − b |G_b|²) / (B − b)
    tr(Σ) ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

Each estimate is unbiased but noisy, so each is smoothed with its own EMA
(bias-corrected like Adam's moments) before taking the ratio.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradkit import _checks

__all__ = ["NoiseScale", "batch_advice"]


class NoiseScale:
    """EMA-smoothed estimates of |G|² and tr(Σ), kept on the device.

    Args:
        beta: EMA decay per measured window, in [0, 1). 0.95 averages about
            the last 20 windows.

    Memory: four scalars.

    Example:
        >>> ns = NoiseScale()
        >>> ns.update(pipe.last.noise)           # on windows with a NoiseSample
        >>> g2, trace, b_simple = ns.estimate()  # tensors; read them when you log
    """

    def __init__(self, beta: float = 0.95) -> None:
        self.beta = _checks.number_in_range("noise_beta", beta, 0.0, 1.0, "pass an EMA decay in [0, 1), e.g. 0.95", low_open=False)
        if self.beta >= 1.0:
            raise ValueError(f"noise_beta must be < 1, got {beta!r}; pass an EMA decay in [0, 1), e.g. 0.95")
        self._g2 = torch.zeros((), dtype=torch.float64)
        self._trace = torch.zeros((), dtype=torch.float64)
        self._count = torch.zeros((), dtype=torch.float64)

    def update(self, sample: Any) -> None:
        """Fold one `NoiseSample` (small_sq, small_batch, big_sq, big_batch) into the EMAs; no host sync.

        A sample whose two batch sizes are equal (a window of one micro-batch)
        carries no information and is ignored, decided on the device.
        """
        small_sq, big_sq = sample.small_sq.double(), sample.big_sq.double()
        device = small_sq.device
        b, big = sample.small_batch.to(device, torch.float64), sample.big_batch.to(device, torch.float64)
        self._g2, self._trace, self._count = (t.to(device) for t in (self._g2, self._trace, self._count))
        valid = (big > b) & torch.isfinite(small_sq) & torch.isfinite(big_sq)
        # torch.where instead of an `if`: invalid windows leave the EMAs as they were, without a host read.
        safe_gap = torch.where(valid, big - b, torch.ones_like(b))
        g2 = (big * big_sq - b * small_sq) / safe_gap
        trace = (small_sq - big_sq) / torch.where(valid, 1 / b - 1 / big, torch.ones_like(b))
        keep = self.beta
        self._g2 = torch.where(valid, keep * self._g2 + (1 - keep) * g2, self._g2)
        self._trace = torch.where(valid, keep * self._trace + (1 - keep) * trace, self._trace)
        self._count = self._count + valid.double()

    def measured(self) -> Tensor:
        """How many valid windows were folded in (a tensor, no host read)."""
        return self._count

    def estimate(self) -> tuple[Tensor, Tensor, Tensor]:
        """(|G|², tr(Σ), B_simple) as bias-corrected tensors; NaN before the first valid window.

        B_simple is NaN while the |G|² estimate is not positive (too few windows
        to tell the signal from the noise).
        """
        correction = 1 - self.beta**self._count
        g2 = self._g2 / correction
        trace = self._trace / correction
        b_simple = torch.where(g2 > 0, trace / g2, torch.full_like(g2, math.nan))
        return g2, trace, b_simple

    def state_dict(self) -> dict[str, Any]:
        return {"g2": self._g2.clone(), "trace": self._trace.clone(), "count": self._count.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _checks.state_keys("NoiseScale", state, {"g2", "trace", "count"})
        for key in ("g2", "trace", "count"):
            if not isinstance(state[key], Tensor) or state[key].numel() != 1:
                raise TypeError(f"NoiseScale.load_state_dict: {key!r} must be a one-element tensor from NoiseScale.state_dict()")
        self._g2, self._trace, self._count = (state[k].detach().double().reshape(()).clone() for k in ("g2", "trace", "count"))


def batch_advice(b_simple: float | None, batch: float | None) -> str | None:
    """One sentence of batch-size advice from B_simple and the current batch (same unit).

    B_simple is a proxy for the critical batch size, not a precise optimum: it
    is noisy and it grows as the loss falls, so the advice is about direction.
    """
    if b_simple is None or batch is None or not math.isfinite(b_simple) or b_simple <= 0 or batch <= 0:
        return None
    head = f"current batch {batch:g}, B_simple ≈ {b_simple:.3g}"
    if batch < 0.5 * b_simple:
        return (
            f"{head}: the batch is below the noise scale, so increasing it up to ~{b_simple:.3g} should still cut "
            "the number of steps nearly proportionally (scale the learning rate with it)"
        )
    if batch <= 2 * b_simple:
        return f"{head}: the batch is near the noise scale; larger batches now give diminishing returns in steps saved per example"
    return (
        f"{head}: the batch is well above the noise scale; much of it averages noise that was already small, "
        f"so a batch near ~{b_simple:.3g} would need about as many steps for less compute"
    )
