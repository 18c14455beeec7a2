"""Quantizers: fewer bits per entry.

`FP16` and `BF16` cast (linear: payloads are all-reduced). `QSGD` is unbiased
stochastic quantization to a few levels per block (Alistarh et al. 2017).
`SignSGD` sends one bit per entry and one scale (Bernstein et al. 2018); with
error feedback it is EF-SignSGD (Karimireddy et al. 2019).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from gradkit import _checks
from gradkit.compression.base import Compressor, Payload, narrow

__all__ = ["FP16", "BF16", "QSGD", "SignSGD"]


class _Cast(Compressor):
    linear = True
    wire_dtype: torch.dtype
    saturate = False  # True under error feedback (see under_error_feedback)

    def compress(self, tensor: Tensor) -> Payload:
        tensor = self._check_input(tensor)
        # A copy even when the dtype already matches: the payload must not alias the input
        # (error feedback computes its residual as input - payload; weighting scales it in place).
        # Alone, an overflow is sent as inf (and its step skipped); under error feedback it is saturated.
        sent = narrow(tensor, self.wire_dtype, copy=True) if self.saturate else tensor.to(self.wire_dtype, copy=True)
        return Payload([sent], tensor.shape, tensor.dtype, self)

    def under_error_feedback(self) -> _Cast:
        """A twin that saturates values beyond the wire dtype's range (see `base.narrow`): under error feedback
        the residual holds the excess, where a cast to inf would leave NaN in it for good."""
        twin = copy.copy(self)
        twin.saturate = True
        return twin

    def decompress(self, payload: Payload) -> Tensor:
        payload = self._check_payload(payload)
        return payload.tensors[0].to(payload.dtype).view(payload.shape)


class FP16(_Cast):
    """Send gradients as float16 (2x fewer bytes than float32; values beyond ±65504 overflow).

    Example:
        >>> pipe = gk.GradientPipeline(model, average=gk.Average(gk.FP16()))
    """

    wire_dtype = torch.float16


class BF16(_Cast):
    """Send gradients as bfloat16 (2x fewer bytes; float32's range, 8 bits of mantissa).

    Example:
        >>> pipe = gk.GradientPipeline(model, average=gk.Average(gk.BF16()))
    """

    wire_dtype = torch.bfloat16


class QSGD(Compressor):
    """Unbiased stochastic quantization to `levels` levels per block (Alistarh et al. 2017,
    "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding").

    Each block of `block` entries sends its L2 norm and, per entry, a signed
    level l in [-levels, levels]: |x|/norm·levels rounded up or down at random
    so that E[norm·l/levels] = x.

    Args:
        levels: quantization levels s (1 ≤ s ≤ 127; one signed byte per entry).
        block: entries per norm (smaller blocks: less variance, more norms sent).

    Example:
        >>> pipe = gk.GradientPipeline(model, average=gk.Average(gk.QSGD(levels=16)))
    """

    def __init__(self, levels: int = 16, *, block: int = 512, seed: int | None = None) -> None:
        self.levels = _checks.positive_int("levels", levels, "pass the number of levels, e.g. 16")
        if self.levels > 127:
            raise ValueError(f"levels must be <= 127 (one signed byte per entry), got {levels}; pass e.g. 16")
        self.block = _checks.positive_int("block", block, "pass the entries per norm, e.g. 512")
        if seed is not None:
            seed = _checks.non_negative_int(
                "seed", seed, "pass an integer >= 0, or None to draw from torch's global generator"
            )
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def compress(self, tensor: Tensor) -> Payload:
        tensor = self._check_input(tensor)
        blocks = _blocks(tensor.reshape(-1).float(), self.block)
        norms = torch.linalg.vector_norm(blocks, dim=1, keepdim=True)
        scaled = blocks.abs() / norms.clamp(min=torch.finfo(torch.float32).tiny) * self.levels
        noise = (
            torch.rand(scaled.shape, generator=self._generator).to(scaled.device)
            if self._generator
            else torch.rand_like(scaled)
        )
        levels = torch.floor(scaled + noise).clamp(max=self.levels) * torch.sign(blocks)
        return Payload([norms.view(-1), levels.to(torch.int8)], tensor.shape, tensor.dtype, self)

    def decompress(self, payload: Payload) -> Tensor:
        payload = self._check_payload(payload)
        norms, levels = payload.tensors
        blocks = levels.float() * (norms.view(-1, 1) / self.levels)
        return blocks.view(-1)[: payload.numel].to(payload.dtype).view(payload.shape)

    def decoding(self) -> dict[str, Any]:
        return {"levels": self.levels, "block": self.block}

    def state_dict(self) -> dict[str, Any]:
        """The seeded generator's state (a uint8 tensor), so a resumed run draws the same
        rounding noise; empty without a seed (torch's global generator is the caller's to save)."""
        return {"generator": self._generator.get_state()} if self._generator is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self._generator is not None:
            generator = state["generator"]
            if (
                not isinstance(generator, Tensor)
                or generator.dtype != torch.uint8
                or generator.shape != self._generator.get_state().shape
            ):
                got = (
                    f"{generator.dtype} {tuple(generator.shape)}"
                    if isinstance(generator, Tensor)
                    else type(generator).__name__
                )
                raise ValueError(
                    f"QSGD.load_state_dict: 'generator' must be the uint8 state from QSGD.state_dict(), got {got}"
                )
            self._generator.set_state(generator)


class SignSGD(Compressor):
    """One bit per entry: the sign, times one scale, the mean magnitude ‖x‖₁/d
    (Bernstein et al. 2018; with error feedback, EF-SignSGD of Karimireddy et al. 2019).

    32x fewer bytes than float32. Biased: `gk.Average` adds error feedback by default.

    Example:
        >>> pipe = gk.GradientPipeline(model, average=gk.Average(gk.SignSGD()))
    """

    biased = True

    def compress(self, tensor: Tensor) -> Payload:
        tensor = self._check_input(tensor)
        flat = tensor.reshape(-1)
        scale = flat.abs().float().mean().reshape(1)
        bits = _blocks((flat >= 0).to(torch.uint8), 8)
        packed = (bits << torch.arange(8, dtype=torch.uint8, device=flat.device)).sum(dim=1, dtype=torch.uint8)
        return Payload([scale, packed], tensor.shape, tensor.dtype, self)

    def decompress(self, payload: Payload) -> Tensor:
        payload = self._check_payload(payload)
        scale, packed = payload.tensors
        bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
        signs = bits.view(-1)[: payload.numel].to(torch.float32) * 2 - 1
        return (signs * scale).to(payload.dtype).view(payload.shape)


def _blocks(flat: Tensor, size: int) -> Tensor:
    """`flat` padded with zeros to a multiple of `size`, as rows of `size`."""
    padding = (-flat.numel()) % size
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return flat.view(-1, size)
