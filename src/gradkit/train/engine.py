"""The training loop of `gradkit demo` and `gradkit train`, run on every worker process.

It wires every part of gradkit into one readable loop: accumulation with
item counts, compressed averaging with error feedback, clipping, tracking,
and checkpoints that resume exactly (model and optimizer from rank 0, each
rank's pipeline state and random state, written atomically).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import gradkit as gk
from gradkit import distributed as gdist
from gradkit.train.config import ConfigError, TrainConfig
from gradkit.train.data import Corpus, load_text
from gradkit.train.model import build_model
from gradkit.train.runs import checkpoint_step, shape_settings

__all__ = ["train_worker", "checkpoint_step"]


def make_compressor(config: TrainConfig, workers: int = 1) -> gk.Compressor | None:
    values = getattr(torch, config.sparse_values)
    # DGC's local clipping: each of N ranks clips its gradient to max_norm / sqrt(N) before
    # accumulating, so that the sum over ranks stays near max_norm (Lin et al. 2018, sec. 3.3).
    local_clip = config.max_norm / math.sqrt(workers) if config.clip == "local" else None
    return {
        "none": lambda: None,
        "topk": lambda: gk.TopK(config.density, value_dtype=values),
        "randomk": lambda: gk.RandomK(config.density, seed=config.seed),
        "dgc": lambda: gk.DGC(
            config.density,
            momentum=config.momentum,
            clip_norm=local_clip,
            warmup_steps=int(config.steps * config.dgc_warmup),
            value_dtype=values,
        ),
        "powersgd": lambda: gk.PowerSGD(config.rank, seed=config.seed),
        "fp16": gk.FP16,
        "bf16": gk.BF16,
        "qsgd": lambda: gk.QSGD(16),
        "sign": gk.SignSGD,
    }[config.compressor]()


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr)
    # DGC accumulates the momentum itself (momentum correction): the optimizer must not add it again
    momentum = 0.0 if config.compressor == "dgc" else config.momentum
    return torch.optim.SGD(params, lr=config.lr, momentum=momentum)


def lr_at(config: TrainConfig, step: int) -> float:
    """The learning rate of 0-based `step`: a function of the step alone, so resume needs no scheduler state."""
    if config.schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))


def make_clip(config: TrainConfig) -> list[gk.ClipStage]:
    return {
        "none": lambda: [],
        "global": lambda: [gk.ClipByGlobalNorm(config.max_norm)],
        "local": lambda: [],  # inside the compressor, before compression (make_compressor)
        "value": lambda: [gk.ClipByValue(config.max_norm)],
        "layer": lambda: [gk.ClipPerLayer(config.max_norm)],
        "agc": lambda: [gk.AGC()],
        "autoclip": lambda: [gk.AutoClip()],
        "zclip": lambda: [gk.ZClip(), gk.ClipByGlobalNorm(config.max_norm)],
    }[config.clip]()


class StopRequest:
    """Ctrl-C or SIGTERM asks to stop; every rank stops after the same step."""

    def __init__(self) -> None:
        self.asked = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._ask)

    def _ask(self, *_: object) -> None:
        self.asked = True

    def agreed(self, distributed: bool) -> bool:
        flag = torch.tensor([1.0 if self.asked else 0.0])
        if distributed:
            gdist.run(dist.all_reduce, "gradkit train: all-reduce of the stop flag", None, flag)  # one tiny collective per step: all ranks stop together
        return bool(flag.item() > 0)


def train_worker(config: TrainConfig) -> dict[str, Any]:
    """Train on this process (torch.distributed initialized for several workers); rank 0 returns the summary."""
    torch.set_num_threads(config.threads)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    stop = StopRequest()
    torch.manual_seed(config.seed)
    corpus = Corpus(load_text(config.text), config.context)
    model = build_model(config.model, corpus.vocab, config.width, config.layers, config.context)
    optimizer = make_optimizer(config, model.parameters())
    writers = ("jsonl", "tensorboard") if _has_tensorboard() else ("jsonl",)
    meta = {"name": config.name, "workers": world, "batch_size": config.micro_batch * config.context * config.accumulation_steps * world}
    tracker = gk.Tracker(config.run_path, every=config.track_every, writers=writers, meta=meta)
    average = gk.Average(make_compressor(config, world))
    pipe = gk.GradientPipeline(model, accumulation_steps=config.accumulation_steps, average=average, clip=make_clip(config), tracker=tracker)
    start = load_checkpoint(config.run_path, rank, world, model, optimizer, pipe)
    progress = _progress(rank, start, config.steps)
    first_eval = evaluate(model, corpus, config) if start == 0 else None
    losses: list[float] = []
    sent = dense = 0
    began, tokens = time.perf_counter(), 0
    step = start
    while step < config.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, step)
        for micro in range(config.accumulation_steps):
            x, y = corpus.batch("train", config.micro_batch, seed=_seed(config.seed, rank, step, micro))
            loss = F.cross_entropy(model(x).reshape(-1, corpus.vocab), y.reshape(-1), reduction="sum")
            pipe.backward(loss, num_items=y.numel())
            pipe.step(optimizer)
            tokens += y.numel() * world
        step += 1
        losses.append(loss.item() / y.numel())
        sent, dense = sent + pipe.last.bytes_sent, dense + pipe.last.dense_bytes
        if progress is not None:
            rate = tokens / max(time.perf_counter() - began, 1e-9)
            progress.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:,.0f}", sent=_size(sent), refresh=False)
            progress.update(1)
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_checkpoint(config.run_path, step, rank, model, optimizer, pipe, distributed, shape_settings(config))
        if step % config.eval_every == 0 and progress is not None:
            progress.write(f"step {step}: validation loss {evaluate(model, corpus, config):.3f}")
        if stop.agreed(distributed):
            save_checkpoint(config.run_path, step, rank, model, optimizer, pipe, distributed, shape_settings(config))
            break
    if progress is not None:
        progress.close()
    tracker.close()
    final_eval = evaluate(model, corpus, config)
    return {
        "rank": rank,
        "workers": world,
        "steps": step,
        "start": start,
        "interrupted": step < config.steps,
        "first_val_loss": first_eval,
        "val_loss": final_eval,
        "train_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1) if losses else None,
        "bytes_sent": sent,
        "dense_bytes": dense,
        "seconds": time.perf_counter() - began,
        "alerts": [a.to_dict() for a in tracker.alerts],
        "noise": next((r["noise"] for r in reversed(tracker.history) if r.get("noise")), None),
        "run_dir": str(config.run_path),
    }


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus: Corpus, config: TrainConfig) -> float:
    """Mean validation loss per character over fixed batches (the same on every rank)."""
    total, count = 0.0, 0
    for i in range(config.eval_batches):
        x, y = corpus.batch("valid", config.micro_batch, seed=10_000_019 + i)
        total += F.cross_entropy(model(x).reshape(-1, corpus.vocab), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    return total / count


def _seed(seed: int, rank: int, step: int, micro: int) -> int:
    return ((seed * 1_000_003 + rank) * 1_000_033 + step) * 131 + micro


# -- checkpoints ---------------------------------------------------------------------


def save_checkpoint(
    run_path: Path, step: int, rank: int, model, optimizer, pipe: gk.GradientPipeline, distributed: bool,
    settings: dict[str, Any] | None = None,
) -> None:
    """Write this rank's state, then (rank 0) the marker naming the step and the shape settings."""
    folder = run_path / "checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    _save_atomic({"pipeline": pipe.state_dict(), "rng": torch.get_rng_state()}, folder / f"rank{rank}.pt")
    if rank == 0:
        _save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, folder / "model.pt")
    if distributed:
        dist.barrier()  # every rank's file is complete before the marker names the step
    if rank == 0:
        marker = folder / "step.json.partial"
        world = dist.get_world_size() if distributed else 1
        marker.write_text(json.dumps({"step": step, "workers": world, "settings": settings or {}}))
        os.replace(marker, folder / "step.json")


def load_checkpoint(run_path: Path, rank: int, world: int, model, optimizer, pipe: gk.GradientPipeline) -> int:
    """Resume from the last complete checkpoint; returns the step to start from (0 without one)."""
    step = checkpoint_step(run_path)
    if step is None:
        return 0
    folder = run_path / "checkpoint"
    saved_world = json.loads((folder / "step.json").read_text()).get("workers", 1)
    if saved_world != world:
        raise ConfigError(
            f"{run_path} holds a checkpoint of a run with {saved_world} workers, this run has {world}; "
            f"resume with workers = {saved_world}, or pick another name to start fresh"
        )
    state = torch.load(folder / "model.pt", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    mine = torch.load(folder / f"rank{rank}.pt", weights_only=True)
    pipe.load_state_dict(mine["pipeline"])
    torch.set_rng_state(mine["rng"])
    return step


def _save_atomic(obj: Any, path: Path) -> None:
    partial = path.with_suffix(path.suffix + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


# -- display -------------------------------------------------------------------------


def _progress(rank: int, start: int, total: int):
    if rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True, mininterval=0.5)


def _size(count: float) -> str:
    """Bytes in SI units, as everywhere in gradkit's output: 1 kB = 1000 B, 1 MB = 10**6 B."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f}{unit}" if unit == "B" else f"{count:.1f}{unit}"
        count /= 1000
    return f"{count:.1f}GB"


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def describe_noise(noise: dict[str, Any] | None) -> str:
    if not noise or noise.get("b_simple") is None or not math.isfinite(noise["b_simple"]):
        return "not enough measured steps for a noise-scale estimate"
    return noise.get("advice") or f"B_simple ≈ {noise['b_simple']:.0f}"
