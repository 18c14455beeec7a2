"""Gradient norm scaling: torch-compatible functions and clipping stages.

- `functional`: `clip_grad_norm_`, `clip_grad_value_`, `grad_norms` (module-level, torch semantics).
- `stages`: fixed-threshold stages (`ClipByGlobalNorm`, `ClipByValue`, `ClipPerLayer`).
- `adaptive`: thresholds from the weights or the norm history (`AGC`, `AutoClip`, `ZClip`).
"""

from gradkit.clipping.adaptive import AGC, AutoClip, ZClip
from gradkit.clipping.functional import clip_grad_norm_, clip_grad_value_, grad_norms
from gradkit.clipping.stages import ClipByGlobalNorm, ClipByValue, ClipPerLayer, ClipStage

__all__ = [
    "AGC",
    "AutoClip",
    "ClipByGlobalNorm",
    "ClipByValue",
    "ClipPerLayer",
    "ClipStage",
    "ZClip",
    "clip_grad_norm_",
    "clip_grad_value_",
    "grad_norms",
]
