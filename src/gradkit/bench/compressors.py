"""Compressors on one GPU: RandomK against TopK, and the fixed-size sparsifiers against torch.topk.

25M float32 entries (a large bucket), density 1%, compress only (what runs per bucket
before the collective). RandomK must cost no more than TopK: it draws its indices on the
device, where a CPU draw and a copy per call cost six times TopK's time. Threshold with
`max_density` and DGC with `exactly_k` share TopK's selection, so each must beat the exact
`torch.topk` it replaces. These are [cuda] rows only (``run`` returns none): on a CPU,
bench_topk's rows measure the same selection.
"""

from __future__ import annotations

import torch

import gradkit
from gradkit.bench import gpu
from gradkit.bench.common import Row, Settings

__all__ = ["run", "run_cuda"]

NUMEL = 25_000_000
TINY_NUMEL = 400_000
DENSITY = 0.01
TOPK = "TopK(0.01)"
TORCH_TOPK = "torch.topk(x.abs(), k)"
RANDOMK_GOAL = 1.0  # no slower than TopK
REPLACES_TOPK_GOAL = 1.0  # faster than the exact top-k


def run(settings: Settings) -> list[Row]:
    return []


def run_cuda(settings: Settings) -> list[Row]:
    numel = TINY_NUMEL if settings.tiny else NUMEL
    size = f"{numel / 1e6:.0f}M" if numel >= 1e6 else f"{numel / 1e3:.0f}k"
    labels = [
        f"RandomK(0.01) compress, {size} fp32",
        f"Threshold(2.5, max_density=0.01) compress, {size} fp32",
        f"DGC(0.01, exactly_k=True) compress, {size} fp32",
    ]
    if not gpu.available():
        return gpu.skipped(labels, TOPK, RANDOMK_GOAL)
    torch.manual_seed(0)
    x = torch.randn(numel, device="cuda")
    k = max(1, int(numel * DENSITY))
    randomk, topk, fixed = gradkit.RandomK(DENSITY), gradkit.TopK(DENSITY), gradkit.TopK(DENSITY, exactly_k=True)
    threshold, dgc = gradkit.Threshold(2.5, max_density=DENSITY), gradkit.DGC(DENSITY, exactly_k=True)
    timings = gpu.measure_cuda(
        {
            "randomk": lambda: randomk.compress(x),
            "topk": lambda: topk.compress(x),
            "fixed": lambda: fixed.compress(x),
            "threshold": lambda: threshold.compress(x),
            "dgc": lambda: dgc.compress(x, key="w"),
            "torch": lambda: torch.topk(x.abs(), k, sorted=False),
        },
        settings,
    )
    name = gpu.device_name()

    def ms(key: str) -> str:
        return f"{timings[key].median * 1e3:.3f} ms"

    randomk_ratio = timings["topk"].median / timings["randomk"].median
    rows = [
        Row(
            labels[0], name, TOPK, RANDOMK_GOAL, timings["randomk"], timings["topk"],
            note=f"{name}; RandomK {ms('randomk')}, TopK(0.01) {ms('topk')} ({randomk_ratio:.2f}x, goal >= 1: "
            f"{'met' if randomk_ratio >= RANDOMK_GOAL else 'MISSED'}); TopK(0.01, exactly_k=True) {ms('fixed')}",
        ),
        Row(
            labels[1], name, TORCH_TOPK, REPLACES_TOPK_GOAL, timings["threshold"], timings["torch"],
            note=f"{name}; {threshold.compress(x).tensors[0].numel()} slots for k = {k} (2.5 sigma: ~1.2% of "
            "the entries qualify, the cap binds)",
        ),
        Row(
            labels[2], name, TORCH_TOPK, REPLACES_TOPK_GOAL, timings["dgc"], timings["torch"],
            note=f"{name}; momentum, velocity, exactly-k selection and masking per call; torch.topk {ms('torch')}",
        ),
    ]  # fmt: skip
    return rows
