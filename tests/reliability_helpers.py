"""Shared pieces of the reliability tests: a model, deterministic data, training
configurations with every kind of pipeline state, checkpoints, and a deep compare."""

from __future__ import annotations

import copy
import io
import math
import os
from typing import Any

import torch
from torch import nn

import gradkit as gk

LR = 0.05
ACCUMULATION = 2


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Three layers; the middle weight has 128 x 144 = 18432 entries, more than the
    sample size of TopK's sampled threshold, so the fast (random) path really runs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 128), nn.Tanh(), nn.Linear(128, 144), nn.Tanh(), nn.Linear(144, 3)).to(dtype)


def items_at(rank: int, micro_step: int) -> int:
    return 3 + (5 * rank + 3 * micro_step) % 7  # uneven per rank and per micro-step


def data(rank: int, micro_step: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * rank + micro_step)
    n = items_at(rank, micro_step)
    return torch.randn(n, 6, generator=g).to(dtype), torch.randn(n, 3, generator=g).to(dtype)


def compressor_for(config: str) -> gk.Compressor | None:
    return {
        "dense": lambda: None,
        "topk": lambda: gk.TopK(0.05),  # Average wraps it in ErrorFeedback
        "dgc": lambda: gk.DGC(0.05, warmup_steps=4),
        "powersgd": lambda: gk.PowerSGD(2),
        "randomk": lambda: gk.RandomK(0.1),
        "qsgd": lambda: gk.QSGD(4, seed=3),
        "scaler": lambda: gk.TopK(0.05),
    }[config]()


def build(config: str, *, tracker: bool = False):
    """(model, optimizer, pipeline) of one configuration, freshly made."""
    dtype = torch.float32 if config == "scaler" else torch.float64
    model = make_model(dtype=dtype)
    if config == "dgc":
        opt = torch.optim.SGD(model.parameters(), lr=LR)  # DGC holds the momentum
    elif config == "powersgd":
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=LR / 10)
    clip = {
        "dense": [gk.ClipByGlobalNorm(0.5)],
        "dgc": [gk.AutoClip(percentile=50, history=3)],
        "powersgd": [gk.ZClip(warmup=2, z_thresh=0.5)],
    }.get(config, [gk.ZClip(warmup=2, z_thresh=0.5), gk.AutoClip(percentile=50, history=3)])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2) if config == "scaler" else None
    pipe = gk.GradientPipeline(
        model,
        accumulation_steps=ACCUMULATION,
        average=gk.Average(compressor_for(config)),
        clip=clip,
        tracker=gk.Tracker(None, every=2) if tracker else None,
        scaler=scaler,
    )
    return model, opt, pipe


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).sum()


def train(objects, rank: int, start: int, stop: int) -> None:
    """Micro-steps start .. stop-1 (item mode: a summed loss and its item count)."""
    model, opt, pipe = objects
    dtype = next(model.parameters()).dtype
    for micro_step in range(start, stop):
        x, y = data(rank, micro_step, dtype)
        pipe.backward(loss_of(model, x, y), num_items=items_at(rank, micro_step))
        pipe.step(opt)


def checkpoint(objects) -> dict[str, Any]:
    """What a training script saves: model, optimizer, pipeline, and torch's RNG (TopK's
    sampled threshold draws from it), through bytes as on disk."""
    model, opt, pipe = objects
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "pipe": pipe.state_dict(), "rng": torch.get_rng_state()},
        buffer,
    )
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def restore(objects, ckpt: dict[str, Any]) -> None:
    model, opt, pipe = objects
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    pipe.load_state_dict(ckpt["pipe"])
    torch.set_rng_state(ckpt["rng"])


def save_atomically(obj: Any, path: str) -> None:
    partial = f"{path}.partial"
    torch.save(obj, partial)
    os.replace(partial, path)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def differences(a: Any, b: Any, where: str = "state") -> list[str]:
    """Where two nested states (dicts, lists, tensors, numbers) differ; empty when equal.
    Tensors must match in dtype, shape and every bit (NaN equals NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape or a.layout != b.layout:
            return [f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        if a.is_sparse:
            a, b = a.coalesce().to_dense(), b.coalesce().to_dense()
        same = torch.equal(a, b) or (
            a.is_floating_point()
            and torch.equal(torch.nan_to_num(a, nan=1.5), torch.nan_to_num(b, nan=1.5))
            and torch.equal(a.isnan(), b.isnan())
        )
        return [] if same else [f"{where}: tensors differ"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}[{k!r}]")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if type(a) is type(b) and a == b else [f"{where}: {a!r} vs {b!r}"]


def snapshot(objects) -> dict[str, Any]:
    """Parameters, gradients, optimizer and pipeline state: all a step could change."""
    model, opt, pipe = objects
    return {
        "params": params_of(model),
        "grads": [p.grad.clone() if p.grad is not None else None for p in model.parameters()],
        "opt": copy.deepcopy(opt.state_dict()),  # the optimizer hands out its live tensors
        "pipe": pipe.state_dict(),
    }


def one_thread():
    """A generator for a module fixture: torch on one thread while the module runs (tiny
    tensors on a small shared machine are many times faster without intra-op threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
