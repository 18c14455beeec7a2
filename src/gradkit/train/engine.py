"""The training loop of `gradkit demo` and `gradkit train`, run on every worker process.

It wires every part of gradkit into one readable loop: accumulation with
item counts, compressed averaging with error feedback, clipping, tracking,
and checkpoints that resume exactly (model and optimizer from rank 0, each
rank's pipeline state and random state, written atomically). Everything runs
on the worker's device, the CPU or its own GPU; on a GPU the step never waits
for the device (the loss is read on logging steps, the stop flag agreed on the host).
"""

from __future__ import annotations

import collections
import functools
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
from gradkit._units import si_bytes
from gradkit.train.config import ConfigError, TrainConfig
from gradkit.train.data import Corpus, load_text
from gradkit.train.device import worker_device
from gradkit.train.model import build_model
from gradkit.train.runs import checkpoint_step, shape_settings

__all__ = ["train_worker", "checkpoint_step", "load_checkpoint", "save_checkpoint"]


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
    """Ctrl-C or SIGTERM asks to stop; every rank stops after the same step.

    The ranks agree over `group`, a gloo group: a flag on the host, so that asking
    every step never waits for the GPU.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.asked = False
        self.group = group
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._ask)

    def _ask(self, *_: object) -> None:
        self.asked = True

    def agreed(self, distributed: bool) -> bool:
        if not distributed:
            return self.asked
        flag = torch.tensor([1.0 if self.asked else 0.0])
        # one tiny host collective per step: all ranks stop together
        gdist.run(dist.all_reduce, "gradkit train: all-reduce of the stop flag", None, flag, group=self.group)
        return bool(flag.item() > 0)


def host_group(device: torch.device) -> dist.ProcessGroup | None:
    """A gloo group for host-side agreement (stop flag, checkpoint barrier): the default group on the CPU,
    a new gloo group of the same ranks beside NCCL (every rank must call this, in the same order)."""
    if dist.get_backend() == "gloo":
        return None  # the default group
    return dist.new_group(backend="gloo")


def choose_device(config: TrainConfig, distributed: bool) -> torch.device:
    """This worker's device. ``auto`` (a caller that skipped the launcher's resolution) follows the
    process group's backend when there is one (NCCL: CUDA, gloo: the CPU), else CUDA when available."""
    kind = config.device
    if kind == "auto":
        if distributed:
            kind = "cuda" if dist.get_backend() == "nccl" else "cpu"
        else:
            kind = "cuda" if torch.cuda.is_available() else "cpu"
    return worker_device(kind)


def _to(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A CPU batch on `device`: through pinned memory, so the copy to a GPU does not wait for it."""
    if device.type == "cpu":
        return batch
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)


def train_worker(config: TrainConfig) -> dict[str, Any]:
    """Train on this process (torch.distributed initialized for several workers); rank 0 returns the summary.

    The model, the batches, the pipeline and its tracker live on this worker's device
    (`choose_device`); checkpoints load onto it whichever device wrote them.
    """
    torch.set_num_threads(config.threads)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = choose_device(config, distributed)
    group = host_group(device) if distributed else None
    stop = StopRequest(group)
    torch.manual_seed(config.seed)
    corpus = Corpus(load_text(config.text), config.context)
    # built on the CPU from the seed, then moved: the same initial weights on every device
    model = build_model(config.model, corpus.vocab, config.width, config.layers, config.context).to(device)
    optimizer = make_optimizer(config, model.parameters())
    writers = ("jsonl", "tensorboard") if _has_tensorboard() else ("jsonl",)
    meta = {
        "name": config.name,
        "workers": world,
        "batch_size": config.micro_batch * config.context * config.accumulation_steps * world,
    }
    tracker = gk.Tracker(config.run_path, every=config.track_every, writers=writers, meta=meta)
    average = gk.Average(make_compressor(config, world))
    pipe = gk.GradientPipeline(
        model, accumulation_steps=config.accumulation_steps, average=average, clip=make_clip(config), tracker=tracker
    )
    start = load_checkpoint(config.run_path, rank, world, model, optimizer, pipe, device)
    progress = _progress(rank, start, config.steps)
    first_eval = evaluate(model, corpus, config) if start == 0 else None
    # The last micro-batch's loss of the last 10 steps, kept on the device: read only on
    # logging steps and at the end, so that the step never waits for the GPU.
    recent: collections.deque[torch.Tensor] = collections.deque(maxlen=10)
    shown: float | None = None
    per_micro = config.micro_batch * config.context
    sent = dense = 0
    began, tokens = time.perf_counter(), 0
    step = start
    checkpoint = functools.partial(
        save_checkpoint,
        config.run_path,
        rank=rank,
        model=model,
        optimizer=optimizer,
        pipe=pipe,
        distributed=distributed,
        settings=shape_settings(config),
        group=group,
    )
    while step < config.steps:
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr_at(config, step)
        for micro in range(config.accumulation_steps):
            x, y = _to(corpus.batch("train", config.micro_batch, seed=_seed(config.seed, rank, step, micro)), device)
            loss = F.cross_entropy(model(x).reshape(-1, corpus.vocab), y.reshape(-1), reduction="sum")
            pipe.backward(loss, num_items=y.numel())
            pipe.step(optimizer)
            tokens += y.numel() * world
        step += 1
        recent.append(loss.detach())
        sent, dense = sent + pipe.last.bytes_sent, dense + pipe.last.dense_bytes
        if progress is not None:
            if shown is None or step % config.track_every == 0 or step == config.steps:
                shown = recent[-1].item() / per_micro  # a logging step: the one read of the loss
            rate = tokens / max(time.perf_counter() - began, 1e-9)
            progress.set_postfix(
                loss=f"{shown:.3f}", tok_s=f"{rate:,.0f}", sent=si_bytes(sent, spec=".1f", sep=""), refresh=False
            )
            progress.update(1)
        if step % config.checkpoint_every == 0 or step == config.steps:
            checkpoint(step)
        if step % config.eval_every == 0 and progress is not None:
            progress.write(f"step {step}: validation loss {evaluate(model, corpus, config):.3f}")
        if stop.agreed(distributed):
            checkpoint(step)
            break
    if progress is not None:
        progress.close()
    tracker.close()
    final_eval = evaluate(model, corpus, config)
    return {
        "rank": rank,
        "workers": world,
        "device": _device_name(device),
        "steps": step,
        "start": start,
        "interrupted": step < config.steps,
        "first_val_loss": first_eval,
        "val_loss": final_eval,
        "train_loss": torch.stack(list(recent)).double().mean().item() / per_micro if recent else None,
        "bytes_sent": sent,
        "dense_bytes": dense,
        "seconds": time.perf_counter() - began,
        "alerts": [a.to_dict() for a in tracker.alerts],
        "noise": next((r["noise"] for r in reversed(tracker.history) if r.get("noise")), None),
        "run_dir": str(config.run_path),
    }


def _device_name(device: torch.device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    if device.type != "cuda":
        return device.type
    return f"{device} ({torch.cuda.get_device_name(device)})"


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus: Corpus, config: TrainConfig) -> float:
    """Mean validation loss per character over fixed batches (the same on every rank and device)."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for i in range(config.eval_batches):
        x, y = _to(corpus.batch("valid", config.micro_batch, seed=10_000_019 + i), device)
        total += F.cross_entropy(model(x).reshape(-1, corpus.vocab), y.reshape(-1), reduction="sum")
        count += y.numel()
    return total.item() / count  # one read for all the batches


def _seed(seed: int, rank: int, step: int, micro: int) -> int:
    return ((seed * 1_000_003 + rank) * 1_000_033 + step) * 131 + micro


# -- checkpoints ---------------------------------------------------------------------


def save_checkpoint(
    run_path: Path,
    step: int,
    rank: int,
    model,
    optimizer,
    pipe: gk.GradientPipeline,
    distributed: bool,
    settings: dict[str, Any] | None = None,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Write this rank's state, then (rank 0) the marker naming the step and the shape settings.

    `group` is the (gloo) group of the barrier before the marker; None: the default group.
    """
    folder = run_path / "checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    mine = {"pipeline": pipe.state_dict(), "rng": torch.get_rng_state()}
    device = next(model.parameters()).device
    if device.type == "cuda":
        mine["cuda_rng"] = torch.cuda.get_rng_state(device)  # TopK's sampled threshold draws from it
    _save_atomic(mine, folder / f"rank{rank}.pt")
    if rank == 0:
        _save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, folder / "model.pt")
    if distributed:
        dist.barrier(group=group)  # every rank's file is complete before the marker names the step
    if rank == 0:
        marker = folder / "step.json.partial"
        world = dist.get_world_size() if distributed else 1
        marker.write_text(json.dumps({"step": step, "workers": world, "settings": settings or {}}))
        os.replace(marker, folder / "step.json")


def load_checkpoint(
    run_path: Path,
    rank: int,
    world: int,
    model,
    optimizer,
    pipe: gk.GradientPipeline,
    device: torch.device | None = None,
) -> int:
    """Resume from the last complete checkpoint; returns the step to start from (0 without one).

    The pipeline state is loaded onto `device` (default: the model's), the model and optimizer
    state through the CPU, so a run saved on a GPU resumes on the CPU and back; the random
    states go where torch keeps them.
    """
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
    device = device if device is not None else next(model.parameters()).device
    # Through the CPU: load_state_dict copies the weights and moves the optimizer state onto the
    # parameters' device, but leaves AdamW's `step` counts where they are, and they must stay on
    # the CPU (a CUDA `step` would cost a host read per parameter per step).
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    mine = torch.load(folder / f"rank{rank}.pt", map_location=device, weights_only=True)
    pipe.load_state_dict(mine["pipeline"])
    torch.set_rng_state(mine["rng"].cpu())  # a generator's state is a CPU byte tensor, whatever the device
    if device.type == "cuda" and "cuda_rng" in mine:  # a CPU checkpoint has none: the seeded state stays
        torch.cuda.set_rng_state(mine["cuda_rng"].cpu(), device)
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
