"""Deep Gradient Compression (Lin et al., ICLR 2018, "Deep Gradient Compression:
Reducing the Communication Bandwidth for Distributed Training").

Per parameter: optional local gradient clipping, momentum correction (the
momentum is accumulated locally, u ← m·u + g, and the *velocity* v ← v + u is
what gets sparsified), top-k of v by a sampled threshold, then momentum factor
masking (u and v are zeroed where entries were sent). A density warm-up starts
dense and shrinks exponentially (25% → 6.25% → 1.56% → 0.4% → target).

DGC moves momentum into the compressor: train with plain SGD (momentum=0).
Its velocity is its error feedback, so `gk.Average` does not add another.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradkit import _checks
from gradkit.clipping.functional import clip_coefficient
from gradkit.compression.base import Compressor, Deferred, Payload, check_density, check_value_dtype
from gradkit.compression.keyed_state import KeyedState, Layout, layout_for, named_fields
from gradkit.compression.sparsify import TopK, scatter_sum

__all__ = ["DGC"]

WARMUP_DENSITIES = (0.25, 0.0625, 0.015625, 0.004)


class DGC(Compressor):
    """Deep Gradient Compression: momentum-corrected, masked, warmed-up top-k.

    Args:
        density: final fraction of entries sent, in (0, 1] (paper: 0.001).
        momentum: the momentum m moved from the optimizer into the compressor.
        clip_norm: clip each compressed tensor's gradient to this L2 norm
            before accumulating (the paper's local clipping); None: off.
        warmup_steps: steps over which the density falls from 25% to `density`
            in four equal phases (0: start at `density`).
        value_dtype: dtype of the sent values.
        exactly_k: send exactly k entries per tensor, chosen as `TopK(exactly_k=True)`
            chooses (a fixed size: no size exchange, no host sync), instead of the
            default fast top-k's 1.5·k slots.

    Memory: two tensors (momentum and velocity) as large as the gradients.

    Example:
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)   # momentum lives in DGC
        >>> pipe = gk.GradientPipeline(model, average=gk.Average(gk.DGC(0.001, warmup_steps=1000)))
    """

    keeps_residual = True
    keyed = True
    sparse = True

    def __init__(
        self,
        density: float,
        momentum: float = 0.9,
        *,
        clip_norm: float | None = None,
        warmup_steps: int = 0,
        value_dtype: torch.dtype | None = None,
        exactly_k: bool = False,
    ) -> None:
        self.density = check_density(density)
        self.momentum = _checks.number_in_range(
            "momentum", momentum, 0.0, 1.0, "pass e.g. 0.9 (0 for none)", low_open=False
        )
        if self.momentum == 1.0:
            raise ValueError("momentum must be < 1; pass e.g. 0.9")
        self.clip_norm = (
            None if clip_norm is None else _checks.positive_number("clip_norm", clip_norm, "pass a norm, or None")
        )
        self.warmup_steps = _checks.non_negative_int("warmup_steps", warmup_steps, "pass 0 for no warm-up")
        self.value_dtype = check_value_dtype(value_dtype)
        self.exactly_k = _checks.flag(
            "exactly_k", exactly_k, "pass exactly_k=True for exactly k entries, False for 1.5·k slots"
        )
        self._state = KeyedState(["momentum", "velocity"])
        self._steps: dict[str, int] = {}
        self._deferred: Deferred[tuple[dict[str, Tensor], Tensor, Tensor, Layout]] = Deferred(self._keep)

    def density_at(self, step: int) -> float:
        """The density used at a 0-based step (the warm-up schedule)."""
        if step >= self.warmup_steps:
            return self.density
        phase = step * len(WARMUP_DENSITIES) // self.warmup_steps
        return max(self.density, WARMUP_DENSITIES[phase])

    def compress(self, tensor: Tensor, key: str | Layout | None = None, *, commit: bool = True) -> Payload:
        tensor = self._check_input(tensor)
        layout = layout_for(key, tensor)
        grad = tensor.reshape(-1)
        state = self._state.get(layout, grad)
        if self.clip_norm is not None:
            grad = grad * clip_coefficient(torch.linalg.vector_norm(grad), self.clip_norm)
        momentum = state["momentum"] * self.momentum + grad
        velocity = state["velocity"] + momentum
        step = self._steps.get(layout[0][0], 0)
        payload = TopK(self.density_at(step), value_dtype=self.value_dtype, exactly_k=self.exactly_k).compress(velocity)
        # Momentum factor masking: what was sent starts over. Only at the sent indices: x - x is
        # exactly 0, and padding (index 0, not valid) subtracts 0, so a repeated index 0 stays exact.
        # (A dense mask of sent counts cost four passes over the tensor.)
        indices, _ = payload.tensors
        indices = indices.long()
        valid = payload.meta.get("valid")
        for state_tensor in (velocity, momentum):
            taken = state_tensor.index_select(0, indices)
            if valid is not None:  # where, not a product: padding must subtract 0 even from an inf
                taken = torch.where(valid, taken, torch.zeros((), dtype=taken.dtype, device=taken.device))
            state_tensor.index_add_(0, indices, taken, alpha=-1)
        payload.owner, payload.shape = self, tensor.shape
        # commit=True keeps this call's state only: other keys' deferred state waits for commit()/discard()
        self._deferred.add(state, momentum, velocity, layout, now=commit)
        return payload

    def _keep(self, state: dict[str, Tensor], momentum: Tensor, velocity: Tensor, layout: Layout) -> None:
        state["momentum"].copy_(momentum)
        state["velocity"].copy_(velocity)
        for name, _ in layout:
            self._steps[name] = self._steps.get(name, 0) + 1

    def decompress(self, payload: Payload) -> Tensor:
        return scatter_sum(self._check_payload(payload))

    def state_dict(self) -> dict[str, Any]:
        return {**self._state.state_dict(), "steps": dict(self._steps)}

    def named_state(self, state: object) -> list[tuple[str, Any, bool]]:
        # A skipped first step leaves momentum and velocity for every parameter but no step counts.
        return named_fields(state, momentum=True, velocity=True, steps=False)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _checks.state_keys("DGC", state, {"momentum", "velocity", "steps"})
        steps = state["steps"]
        if not isinstance(steps, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in steps.values()
        ):
            raise TypeError("DGC.load_state_dict: 'steps' must map parameter names to step counts >= 0")
        self._state.load_state_dict({"momentum": state["momentum"], "velocity": state["velocity"]}, "DGC")
        self._steps = dict(steps)
        self.discard()  # deferred state belongs to the state just replaced
