"""Which device a run trains on: ``auto``, ``cpu`` or ``cuda``, resolved before any worker starts.

The launching process turns ``auto`` into ``cpu`` or ``cuda`` (`resolve_device`)
and refuses a ``cuda`` it cannot honour in one line naming what it found. Each
worker then takes its own device (`worker_device`: one GPU per local rank) and
the matching process-group backend (`backend_for`: NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import os

import torch

from gradkit.train.config import DEVICES, ConfigError

__all__ = ["DEVICES", "backend_for", "describe_device", "local_workers", "resolve_device", "worker_device"]


def local_workers(workers: int) -> int:
    """How many workers this machine runs: torchrun's ``LOCAL_WORLD_SIZE`` under torchrun, else `workers`."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value and value.isdigit() else workers


def resolve_device(requested: str, workers: int) -> str:
    """``cpu`` or ``cuda`` for a run with `workers` local workers; ``auto`` picks CUDA when it can.

    ``auto`` is CUDA when it is available with at least one GPU per local worker
    (NCCL cannot put two ranks on one GPU), else the CPU.

    Args:
        requested: ``auto``, ``cpu`` or ``cuda``.
        workers: worker processes on this machine (see `local_workers`).

    Returns:
        ``"cpu"`` or ``"cuda"``.

    Raises:
        ConfigError: ``cuda`` without a usable CUDA, or with fewer GPUs than local workers.

    Example:
        >>> resolve_device("cpu", 2)
        'cpu'
    """
    if requested not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {requested!r}")
    if requested == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if available else 0
    if requested == "auto":
        return "cuda" if available and gpus >= workers else "cpu"
    if not available:
        raise ConfigError(f"--device cuda: torch.cuda.is_available() is False ({_cuda_found()}); {_cuda_fix()}")
    if workers > gpus:
        raise ConfigError(
            f"--device cuda with {workers} workers on this machine needs {workers} GPUs (one per worker), "
            f"found {gpus}; pass --workers {gpus} (or nproc_per_node={gpus} under torchrun), or --device cpu"
        )
    return "cuda"


def describe_device(requested: str, resolved: str, workers: int) -> str:
    """A few words for the banner: the device, and why ``auto`` chose the CPU where CUDA is there."""
    if resolved == "cuda":
        return "cuda (one GPU per worker)"
    if requested == "auto" and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        return f"cpu ({workers} workers, {gpus} GPU(s): pass --workers {gpus} to train on CUDA)"
    return "cpu"


def worker_device(kind: str) -> torch.device:
    """This worker's device: the CPU, or the GPU of its local rank (made the current CUDA device).

    Args:
        kind: ``cpu`` or ``cuda`` (as `resolve_device` returns).

    Returns:
        ``torch.device("cpu")`` or ``torch.device("cuda", LOCAL_RANK)`` (``LOCAL_RANK`` 0 without a launcher).

    Raises:
        ConfigError: a local rank without a GPU of its own.

    Example:
        >>> worker_device("cpu")
        device(type='cpu')
    """
    if kind != "cuda":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpus = torch.cuda.device_count()
    if local_rank >= gpus:
        raise ConfigError(
            f"--device cuda: local rank {local_rank} has no GPU of its own ({gpus} found); "
            f"start at most {gpus} workers per machine, or pass --device cpu"
        )
    torch.cuda.set_device(local_rank)  # NCCL and every default-device call of this process use it
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device) -> str:
    """The process-group backend for `device`: NCCL on CUDA, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def _cuda_found() -> str:
    """What this process sees of CUDA, for an error message."""
    built = torch.version.cuda
    if built is None and getattr(torch.version, "hip", None) is None:
        return f"torch {torch.__version__}, a CPU build"
    toolkit = f"CUDA {built}" if built else f"ROCm {torch.version.hip}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "no GPU or driver found"
    return f"torch {torch.__version__}, built for {toolkit}; {where}"


def _cuda_fix() -> str:
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return "pass --device cpu or install a CUDA build of torch"
    return "pass --device cpu, or check the GPU driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"
