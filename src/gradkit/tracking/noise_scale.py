"""The gradient noise scale B_simple and the batch-size advice it gives.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch
Training": the simple noise scale ``B_simple = tr(Σ) / |G|²`` (Σ: the
per-example gradient covariance, G: the true gradient) predicts the critical
batch size, below which a larger batch cuts the number of steps almost
proportionally and above which the returns diminish.

Both quantities come from the squared norm of one gradient measured at two
batch sizes b < B. `NoiseProbe` takes them for the pipeline on measured
windows: the first micro-batch against the whole window, or this rank against
the all-reduced gradient::

    |G|²  ≈ (B |G_B|² − b |G_b|²) / (B − b)
    tr(Σ) ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

Each estimate is unbiased but noisy, so each is smoothed with its own EMA
(bias-corrected like Adam's moments) before taking the ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradkit import _checks, _dtensor
from gradkit._scalars import on_device
from gradkit.context import GradContext
from gradkit.step_report import NoiseSample

__all__ = ["NoiseProbe", "NoiseScale", "batch_advice"]


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
        self.beta = _checks.number_in_range(
            "noise_beta", beta, 0.0, 1.0, "pass an EMA decay in [0, 1), e.g. 0.95", low_open=False
        )
        if self.beta >= 1.0:
            raise ValueError(f"noise_beta must be < 1, got {beta!r}; pass an EMA decay in [0, 1), e.g. 0.95")
        self._g2 = torch.zeros((), dtype=torch.float64)
        self._trace = torch.zeros((), dtype=torch.float64)
        self._count = torch.zeros((), dtype=torch.float64)
        self._estimate: tuple[Tensor, Tensor, Tensor] | None = None  # kept until the EMAs change

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
        self._estimate = None

    def measured(self) -> Tensor:
        """How many valid windows were folded in (a tensor, no host read)."""
        return self._count

    def estimate(self) -> tuple[Tensor, Tensor, Tensor]:
        """(|G|², tr(Σ), B_simple) as bias-corrected tensors; NaN before the first valid window.

        B_simple is NaN while the |G|² estimate is not positive (too few windows
        to tell the signal from the noise). Kept until the next `update`: a tracker that logs
        windows without a sample (one micro-batch, one process) asks for the same values every step; the
        tensors are shared between calls, so read them, do not modify them in place.
        """
        if self._estimate is not None:
            return self._estimate
        correction = 1 - self.beta**self._count
        g2 = self._g2 / correction
        trace = self._trace / correction
        b_simple = torch.where(g2 > 0, trace / g2, torch.full_like(g2, math.nan))
        self._estimate = (g2, trace, b_simple)
        return self._estimate

    def state_dict(self) -> dict[str, Any]:
        return {"g2": self._g2.clone(), "trace": self._trace.clone(), "count": self._count.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _checks.state_keys("NoiseScale", state, {"g2", "trace", "count"})
        for key in ("g2", "trace", "count"):
            if not isinstance(state[key], Tensor) or state[key].numel() != 1:
                raise TypeError(
                    f"NoiseScale.load_state_dict: {key!r} must be a one-element tensor from NoiseScale.state_dict()"
                )
        self._g2, self._trace, self._count = (
            state[k].detach().double().reshape(()).clone() for k in ("g2", "trace", "count")
        )
        self._estimate = None


class NoiseProbe:
    """Takes one window's gradient at two batch sizes for the noise scale, on the windows the tracker logs.

    The pipeline calls it at two moments of each window, and asks it for the sample at the report:

    - `after_first_backward`: ``p.grad`` holds the first micro-batch alone, the small batch
      (with ``accumulation_steps > 1``);
    - `before_reduction`: ``p.grad`` still holds this process's whole window when the sync
      keeps it there (`gk.Average`): the small batch against the averaged one, or, when
      compression makes the averaged gradient lossy, the big batch;
    - `sample` (after the reduction and the unscale): the `NoiseSample`, or None.

    Args:
        names, params: the pipeline's parameters.
        wants: ``wants(step) -> bool``, whether the window ending at optimizer step `step`
            is measured (the tracker's); None measures nothing.
        accumulation_steps: micro-batches per window.
        scaler: the ``GradScaler`` whose loss scale the gradients carry until unscaled, or None.
        lossy: whether the averaged gradient is an approximation (compressed averaging).
        local_window: whether ``p.grad`` holds this process's own window before the reduction.

    Sharded parameters (DTensor: FSDP2, tensor parallel) give no sample: after the first
    micro-batch the gradient is already summed over processes (``reduce="every"``) or not in
    ``p.grad`` yet (``reduce="boundary"``), and no process holds its own window before the
    reduction. `unavailable` says so; the tracker's noise scale then stays unmeasured.

    Cost: on measured windows only, one pass over the gradients per moment used (their
    per-parameter norms); no host read.

    Example:
        >>> probe = NoiseProbe(names, params, wants=tracker.wants, accumulation_steps=4)
        >>> probe.after_first_backward(num_items, step=1)      # after the first backward
        >>> probe.before_reduction(window)                     # before the all-reduce
        >>> report_noise = probe.sample(total_norm, items)     # NoiseSample or None
    """

    def __init__(
        self,
        names: Sequence[str],
        params: Sequence[Tensor],
        *,
        wants: Callable[[int], bool] | None,
        accumulation_steps: int = 1,
        scaler: Any = None,
        lossy: bool = False,
        local_window: bool = False,
    ) -> None:
        self.names, self.params = list(names), list(params)
        self.wants, self.accumulation_steps, self.scaler = wants, accumulation_steps, scaler
        self.lossy, self.local_window = lossy, local_window
        #: why no window is ever measured (sharded parameters), or None
        self.unavailable: str | None = None
        if _dtensor.any_dtensor(self.params):
            self.unavailable = (
                "sharded parameters (FSDP2 or tensor parallel): no process holds its own micro-batch "
                "or window gradient, so no two batch sizes can be compared"
            )
        self.reset()

    def reset(self) -> None:
        """Forget the window in progress (the pipeline calls it when a window ends)."""
        self._measuring = False
        self._small: tuple[Tensor, Tensor] | None = None
        self._local: tuple[list[str], Tensor, Tensor] | None = None  # names, norms of the mean, batch

    def after_first_backward(self, num_items: int | Tensor | None, *, step: int) -> None:
        """Decide whether the window ending at `step` is measured, and take its first micro-batch."""
        self.reset()
        self._measuring = self.wants is not None and self.unavailable is None and bool(self.wants(step))
        if self._measuring and self.accumulation_steps > 1:
            sq = self._local_norms()[1].square().sum()
            count = on_device(num_items if num_items is not None else 1, sq.device, torch.float64)
            # A summed loss's gradient is count x the mean; a mean loss's already is the mean.
            self._small = (sq / count**2 if num_items is not None else sq, count)

    def before_reduction(self, window: Any) -> None:
        """Take this process's whole window (a `Window`: items or micro-steps), if it is in ``p.grad``."""
        if self._measuring and self.local_window:
            names, norms = self._local_norms()
            count = on_device(window.items if window.item_mode else window.micro_steps, norms.device, torch.float64)
            self._local = (names, norms / count, count)

    def pre_clip_norms(self, ctx: GradContext) -> Tensor | None:
        """The per-parameter norms the tracker should judge (``ctx.pre_clip_norms``): the
        averaged gradient's, or under compression this process's dense window's."""
        if not len(ctx):
            return None
        if self._local is None or not self.lossy:
            return ctx.norms()  # stages replace, never mutate, the cache
        # Compressed averaging zeroes most entries: layer statistics and alerts should judge
        # this process's dense gradient.
        names, norms, _ = self._local
        by_name = dict(zip(names, norms))
        zero = norms.new_zeros(())
        return torch.stack([by_name.get(name, zero) for name in ctx.names]).to(ctx.norms())

    def sample(self, total_norm: Tensor, items: Tensor) -> NoiseSample | None:
        """The window's sample: the first micro-batch or this process's window (small) against
        the averaged window (big: `total_norm`, `items`), or this process's window when
        compression made the averaged one lossy. None on windows not measured."""
        small, local = self._small, self._local
        if small is None and (local is None or self.lossy):
            return None  # a window not measured: decided before any operation (each a launch on a GPU)
        local_sq = None if local is None else (local[1].square().sum(), local[2])
        # The big batch: the averaged window, or this process's window when compression made the averaged one lossy.
        big = local_sq if local_sq is not None and self.lossy else (total_norm.double() ** 2, items.double())
        small = small if small is not None else local_sq
        device = small[0].device
        return NoiseSample(
            small_sq=small[0], small_batch=small[1].to(device), big_sq=big[0].to(device), big_batch=big[1].to(device)
        )

    def _local_norms(self) -> tuple[list[str], Tensor]:
        """Names and L2 norms of this process's gradients as they are now (loss scale divided out)."""
        ctx = GradContext(self.names, self.params)
        norms = ctx.norms().double() if len(ctx) else torch.zeros(0, dtype=torch.float64)
        if self.scaler is not None and self.scaler.is_enabled():
            norms = norms / self.scaler._get_scale_async().double().to(norms.device)
        return ctx.names, norms


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
        return (
            f"{head}: the batch is near the noise scale; "
            "larger batches now give diminishing returns in steps saved per example"
        )
    return (
        f"{head}: the batch is well above the noise scale; much of it averages noise that was already small, "
        f"so a batch near ~{b_simple:.3g} would need about as many steps for less compute"
    )
