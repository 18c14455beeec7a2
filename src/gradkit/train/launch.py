"""Start the training engine on local worker processes, or join a torchrun job.

`run_training` checks everything a user can get wrong first (config, text,
run directory), so such errors never cost a process launch. Several local
workers are started through torch's own elastic launcher API (the engine
behind torchrun), with a local rendezvous; under ``torchrun`` (multi-node),
this process already is one worker and just joins the group.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import uuid
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from gradkit._files import make_writable_dir
from gradkit.train.config import ConfigError, TrainConfig
from gradkit.train.data import Corpus, load_text

__all__ = ["run_training", "under_torchrun", "MAX_LOCAL_WORKERS"]

#: more local workers than this only time-share the cores
MAX_LOCAL_WORKERS = max(8, 2 * (os.cpu_count() or 1))


def under_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def check_setup(config: TrainConfig) -> None:
    """Everything a user can get wrong, checked before any process starts."""
    if not under_torchrun() and config.workers > MAX_LOCAL_WORKERS:
        raise ConfigError(
            f"workers={config.workers} is more than this machine can use ({os.cpu_count()} cores); "
            f"pass at most {MAX_LOCAL_WORKERS}, or launch across machines with torchrun"
        )
    Corpus(load_text(config.text), config.context)
    path = config.run_path
    try:
        make_writable_dir(path)
    except OSError as error:
        raise ConfigError(f"cannot write to the run directory {str(path)!r}: {error.strerror}; pass a writable --run-dir") from None


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Train with `config.workers` processes (or as one torchrun worker); rank 0's summary."""
    check_setup(config)
    if under_torchrun():
        return _join_and_train(dataclasses.asdict(config))
    if config.workers == 1:
        from gradkit.train.engine import train_worker

        return train_worker(config)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: talk over loopback
    options: dict[str, Any] = {}
    if "signals_to_handle" in {f.name for f in dataclasses.fields(LaunchConfig)}:
        # Ctrl-C is ours: the workers stop together after a step and save (see _forward_interrupt).
        options["signals_to_handle"] = "SIGTERM,SIGHUP,SIGQUIT"
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=config.workers,
        run_id=f"gradkit-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        start_method="spawn",
        monitor_interval=0.5,
        **options,
    )
    previous = signal.signal(signal.SIGINT, _forward_interrupt)
    try:
        results = elastic_launch(launch, _join_and_train)(dataclasses.asdict(config))
    finally:
        signal.signal(signal.SIGINT, previous)
    return results[0]


def _forward_interrupt(signum: int, frame: object) -> None:
    """First Ctrl-C: tell the workers, which finish the step, save a checkpoint and return.
    A second one stops at once."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGINT)  # a terminal sends it to them too; twice is harmless


def _join_and_train(values: dict[str, Any]) -> dict[str, Any]:
    from gradkit.train.engine import train_worker

    config = TrainConfig(**values)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    try:
        return train_worker(config)
    finally:
        dist.destroy_process_group()
