"""Adaptive norm-scaling stages: AGC, AutoClip, ZClip.

Their thresholds come from the weights (AGC) or from the history of gradient
norms (AutoClip, ZClip). History and running statistics stay tensors on the
gradients' device, so a step never waits for the host. The pipeline only
calls a stage on finite steps; called on every step (on parameters, or by a
trainer's callback), AutoClip and ZClip keep a non-finite norm out of their
history and statistics on the device, without a host read.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from gradkit import _checks
from gradkit.clipping.functional import clip_coefficient
from gradkit.clipping.stages import ClipStage, state_tensor
from gradkit.context import GradContext, named_pairs

__all__ = ["AGC", "AutoClip", "ZClip"]


class AGC(ClipStage):
    """Adaptive gradient clipping, unit-wise (Brock et al. 2021, "High-Performance
    Large-Scale Image Recognition Without Normalization").

    For each unit (an output row of a weight: all dims but the first; a whole
    1-D tensor), if ``|G| / max(|W|, eps) > clip`` the unit's gradient is scaled
    to ``clip * max(|W|, eps)``.

    Args:
        clip: λ, the largest allowed gradient-to-weight norm ratio (paper: 0.01
            for batch 4096, larger for smaller batches).
        eps: floor of the weight norm, so zero-initialised units can move.
        exclude: parameter-name patterns (fnmatch) left unclipped; the paper
            leaves the final classifier out, e.g. ``exclude=("fc.*",)``.

    Memory: one norm per unit, per parameter, during the call.

    Example:
        >>> pipe = gk.GradientPipeline(model, clip=gk.AGC(0.01, exclude=("head.*",)))
    """

    def __init__(self, clip: float = 0.01, eps: float = 1e-3, *, exclude: Iterable[str] = ()) -> None:
        self.clip = _checks.positive_number("clip", clip, "pass λ, e.g. 0.01")
        self.eps = _checks.positive_number("eps", eps, "pass the weight-norm floor, e.g. 1e-3")
        if isinstance(exclude, str):
            raise TypeError(
                f"exclude must be a list of name patterns, got the string {exclude!r}; wrap it: ({exclude!r},)"
            )
        try:
            patterns = tuple(exclude)
        except TypeError:
            raise TypeError(
                f"exclude must be a list of name patterns, got {type(exclude).__name__} {exclude!r}; pass e.g. "
                "('fc.*',), or () for none"
            ) from None
        if not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"exclude must hold name patterns (strings), got {patterns!r}; pass e.g. ('fc.*',)")
        self.exclude = patterns

    @torch.no_grad()
    def __call__(self, grads: GradContext | Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Tensor) -> None:
        if self.exclude and not isinstance(grads, GradContext):
            grads = [grads] if isinstance(grads, Tensor) else list(grads)
            named = named_pairs(grads)
            grads = GradContext.from_parameters(grads)
            if not named and len(grads) and not any(map(self._excluded, grads.names)):
                # Unnamed tensors are named by position ("0", "1", ...): a pattern such as "fc.*" would match
                # none of them, and the layers it means to leave out would be clipped.
                raise ValueError(
                    f"AGC(exclude={self.exclude!r}) matches none of the parameters, which are unnamed and so named "
                    f"by position ('0' to '{len(grads) - 1}'); pass model.named_parameters(), or call it inside a "
                    "GradientPipeline"
                )
        super().__call__(grads)

    def _excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude)

    def apply_(self, ctx: GradContext) -> None:
        for name, param, grad in zip(ctx.names, ctx.params, ctx.grads):
            if self._excluded(name):
                continue
            max_norm = unitwise_norm(param.detach()).clamp(min=self.eps) * self.clip
            grad_norm = unitwise_norm(grad)
            # torch.where instead of an `if` keeps the decision on the device.
            factor = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp(min=1e-6), torch.ones_like(grad_norm))
            grad.mul_(factor)
        ctx.modified()


def unitwise_norm(x: Tensor) -> Tensor:
    """L2 norm per output unit: over all dims but the first (whole tensor for 0-d/1-d)."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


class AutoClip(ClipStage):
    """Clip the global norm at a percentile of the norms seen so far (Seetharaman
    et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation Networks").

    Each step appends the current global L2 norm to a bounded history (a ring
    buffer of the last `history` norms) and clips to its `percentile`-th percentile.

    Args:
        percentile: in (0, 100]; the paper recommends 10.
        history: how many recent norms to keep (>= 1).

    Memory: `history` scalars on the gradients' device.

    Example:
        >>> pipe = gk.GradientPipeline(model, clip=gk.AutoClip(percentile=10))
    """

    def __init__(self, percentile: float = 10, *, history: int = 10_000) -> None:
        self.percentile = _checks.number_in_range(
            "percentile", percentile, 0.0, 100.0, "pass e.g. 10 for the 10th percentile"
        )
        self.history = _checks.positive_int("history", history, "pass how many recent norms to keep, e.g. 10000")
        self._norms = torch.zeros(self.history)
        self._count = 0

    def apply_(self, ctx: GradContext) -> None:
        norm = ctx.total_norm()
        self._norms = self._norms.to(norm)
        # A non-finite norm is kept as NaN, which nanquantile leaves out: one bad step does not set the threshold.
        self._norms[self._count % self.history] = torch.where(norm.isfinite(), norm, torch.nan)
        self._count += 1
        seen = self._norms[: min(self._count, self.history)]
        threshold = torch.nanquantile(seen, self.percentile / 100.0)
        ctx.scale_(clip_coefficient(norm, threshold))

    def state_dict(self) -> dict[str, Any]:
        return {"norms": self._norms.clone(), "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        norms = state_tensor(state["norms"], "norms", "AutoClip")
        if norms.shape != (self.history,):
            raise ValueError(
                f"AutoClip.load_state_dict: norms has shape {tuple(norms.shape)}, expected ({self.history},); build "
                "AutoClip with the history it was saved with"
            )
        count = _checks.non_negative_int("count", state["count"], "pass the count from AutoClip.state_dict()")
        self._norms, self._count = norms.clone(), count


class ZClip(ClipStage):
    """Clip norm spikes found by a z-score against EMA statistics (Kumar et al. 2025,
    "ZClip: Adaptive Spike Mitigation for LLM Pre-Training").

    The first `warmup` steps only collect norms; their mean and variance start
    the EMAs. Then, with z = (norm − mean) / (std + eps), a step with z > z_thresh
    is clipped to ``mean + z_thresh² · std / z`` (the further the outlier, the
    harder the clip), and the EMAs are updated with the norm that was applied.

    Args:
        alpha: EMA decay of mean and variance, in (0, 1).
        z_thresh: z-score above which a norm counts as a spike (> 0).
        warmup: steps collected before clipping starts (>= 1).
        eps: added to the std.

    Memory: `warmup` + 2 scalars on the gradients' device.

    Example:
        >>> pipe = gk.GradientPipeline(model, clip=[gk.ZClip(), gk.ClipByGlobalNorm(1.0)])
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, *, warmup: int = 25, eps: float = 1e-6) -> None:
        self.alpha = _checks.number_in_range("alpha", alpha, 0.0, 1.0, "pass the EMA decay, e.g. 0.97")
        if self.alpha == 1.0:
            raise ValueError("alpha must be < 1 (with alpha=1 the statistics never move); pass e.g. 0.97")
        self.z_thresh = _checks.positive_number("z_thresh", z_thresh, "pass the spike z-score, e.g. 2.5")
        self.warmup = _checks.positive_int("warmup", warmup, "pass the number of warm-up steps, e.g. 25")
        self.eps = _checks.positive_number("eps", eps, "pass a small constant, e.g. 1e-6")
        self._warmup_norms = torch.zeros(self.warmup)
        self._mean = torch.zeros(())
        self._var = torch.zeros(())
        self._count = 0

    def apply_(self, ctx: GradContext) -> None:
        norm = ctx.total_norm()
        finite = norm.isfinite()  # a non-finite step leaves the statistics as they were (a device select, no read)
        if self._count < self.warmup:
            self._warmup_norms = self._warmup_norms.to(norm)
            self._warmup_norms[self._count] = torch.where(finite, norm, torch.nan)
            self._count += 1
            if self._count == self.warmup:  # of the finite warm-up norms (NaN marks the others)
                self._mean = self._warmup_norms.nanmean()
                self._var = (self._warmup_norms - self._mean).square().nanmean()
            return
        mean, var = self._mean.to(norm), self._var.to(norm)
        std = var.sqrt()
        z = (norm - mean) / (std + self.eps)
        spike = z > self.z_thresh
        # torch.where keeps the spike decision on the device; the division by z is
        # only selected where z > z_thresh > 0.
        applied = torch.where(spike, mean + self.z_thresh**2 * std / z, norm)
        # A step that is no spike is left exactly as it is: torch's coefficient
        # norm / (norm + 1e-6) would shrink it, by half for a norm of 1e-6.
        ctx.scale_(torch.where(spike, clip_coefficient(norm, applied), torch.ones_like(norm)))
        new_mean = self.alpha * mean + (1 - self.alpha) * applied
        new_var = self.alpha * var + (1 - self.alpha) * (applied - new_mean) ** 2
        self._mean, self._var = torch.where(finite, new_mean, mean), torch.where(finite, new_var, var)
        self._count += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "warmup_norms": self._warmup_norms.clone(),
            "mean": self._mean.clone(),
            "var": self._var.clone(),
            "count": self._count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        warmup_norms = state_tensor(state["warmup_norms"], "warmup_norms", "ZClip")
        if warmup_norms.shape != (self.warmup,):
            raise ValueError(
                f"ZClip.load_state_dict: warmup_norms has shape {tuple(warmup_norms.shape)}, expected "
                f"({self.warmup},); build ZClip with the warmup it was saved with"
            )
        mean = state_tensor(state["mean"], "mean", "ZClip")
        var = state_tensor(state["var"], "var", "ZClip")
        for name, value in (("mean", mean), ("var", var)):
            if value.shape != ():
                raise ValueError(
                    f"ZClip.load_state_dict: {name} has shape {tuple(value.shape)}, expected a 0-d tensor; pass the "
                    "state from ZClip.state_dict()"
                )
        count = _checks.non_negative_int("count", state["count"], "pass the count from ZClip.state_dict()")
        self._warmup_norms, self._mean, self._var, self._count = warmup_norms.clone(), mean.clone(), var.clone(), count
