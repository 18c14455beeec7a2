"""Start the training engine on local worker processes, or join a torchrun job.

`run_training` checks everything a user can get wrong first (config, device,
text, run directory), so such errors never cost a process launch. Several local
workers are started through torch's own elastic launcher API (the engine
behind torchrun), with a local rendezvous; under ``torchrun`` (multi-node),
this process already is one worker and just joins the group. On CUDA each
worker takes the GPU of its local rank and the group runs on NCCL; on the CPU, gloo.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import traceback
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from gradkit._files import make_writable_dir
from gradkit.train.config import ConfigError, TrainConfig
from gradkit.train.data import Corpus, load_text
from gradkit.train.device import backend_for, local_workers, resolve_device, worker_device
from gradkit.train.runs import ERROR_LOG, check_resumable

__all__ = ["MAX_LOCAL_WORKERS", "WorkerError", "check_setup", "run_training", "under_torchrun"]

#: more local workers than this only time-share the cores
MAX_LOCAL_WORKERS = max(8, 2 * (os.cpu_count() or 1))


def under_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


class WorkerError(RuntimeError):
    """A worker process failed: a one-line message; `log` is the file with the full tracebacks."""

    def __init__(self, message: str, log: Path) -> None:
        super().__init__(message)
        self.log = log


def check_setup(config: TrainConfig, *, fresh: bool = False) -> TrainConfig:
    """Everything a user can get wrong, checked before any process starts; the config on its resolved device.

    Args:
        config: the run's settings.
        fresh: the run folder is about to start over (``--fresh``): whatever checkpoint it
            holds does not need to fit these settings.

    Returns:
        `config` with ``device`` resolved to ``"cpu"`` or ``"cuda"`` (see `resolve_device`).

    Raises:
        ConfigError: too many local workers, ``--device cuda`` without CUDA or with
            fewer GPUs than local workers, a missing or empty text, an unwritable
            run folder, or a checkpoint there that these settings cannot resume.
    """
    if not under_torchrun() and config.workers > MAX_LOCAL_WORKERS:
        raise ConfigError(
            f"workers={config.workers} is more than this machine can use ({os.cpu_count()} cores); "
            f"pass at most {MAX_LOCAL_WORKERS}, or launch across machines with torchrun"
        )
    config = dataclasses.replace(config, device=resolve_device(config.device, local_workers(config.workers)))
    Corpus(load_text(config.text), config.context)
    path = config.run_path
    try:
        make_writable_dir(path)
    except OSError as error:
        raise ConfigError(
            f"cannot write to the run directory {str(path)!r}: {error.strerror}; pass a writable --run-dir"
        ) from None
    if not fresh:
        check_resumable(config)
    return config


def run_training(config: TrainConfig, *, checked: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Train with `config.workers` processes (or as one torchrun worker); rank 0's summary.

    Args:
        config: the run's settings; ``device = "auto"`` is resolved here, once, for every worker.
        checked: `check_setup(config)` already passed (the CLI checks before its banner).
        verbose: let torch's launcher log what it does (worker starts and failures).

    Raises:
        ConfigError: see `check_setup`.
        WorkerError: a worker failed; its traceback is in ``RUN_DIR/error.log``.
    """
    if not checked:
        config = check_setup(config)
    elif config.device == "auto":
        config = dataclasses.replace(config, device=resolve_device(config.device, local_workers(config.workers)))
    (config.run_path / ERROR_LOG).unlink(missing_ok=True)
    if under_torchrun():
        return _join_and_train(dataclasses.asdict(config))
    if config.workers == 1:
        from gradkit.train.engine import train_worker

        try:
            return train_worker(config)
        except (ConfigError, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001 - any failure: logged in full, reported in one line
            _log_failure(config, 0, error)
            raise _worker_error(config) from None
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
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    previous = signal.signal(signal.SIGINT, _forward_interrupt)
    # A failure is reported once, by us, from the log the worker wrote; torch's launcher logs it too.
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [logger.level for logger in loggers]
    if not verbose:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(launch, _join_and_train)(dataclasses.asdict(config))
    except ChildFailedError:
        raise _worker_error(config) from None
    finally:
        signal.signal(signal.SIGINT, previous)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return results[0]


def _log_failure(config: TrainConfig, rank: int, error: BaseException) -> None:
    """Append this worker's traceback, headed by one summary line, to the run folder's error log."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    first = next((line for line in str(error).splitlines() if line.strip()), "")
    try:
        with open(config.run_path / ERROR_LOG, "a", encoding="utf-8") as log:
            log.write(f"worker {rank} failed: {type(error).__name__}: {first}\n{text}\n")
    except OSError:
        sys.stderr.write(text)  # nowhere to keep it: show it rather than lose it


def _worker_error(config: TrainConfig) -> WorkerError:
    log = config.run_path / ERROR_LOG
    try:
        head = log.read_text(encoding="utf-8").splitlines()[0]
    except (OSError, IndexError):
        head = "a worker process stopped without a Python error (killed, or out of memory)"
    if len(head) > 240:
        head = head[:237] + "..."
    return WorkerError(f"{head} (the full traceback is in {log}; --verbose prints it)", log)


def _forward_interrupt(signum: int, frame: object) -> None:
    """First Ctrl-C: tell the workers, which finish the step, save a checkpoint and return.
    A second one stops at once."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGINT)  # a terminal sends it to them too; twice is harmless


def _join_and_train(values: dict[str, Any]) -> dict[str, Any]:
    from gradkit.train.engine import train_worker

    config = TrainConfig(**values)
    try:
        # One GPU per local rank, chosen before the group starts: NCCL binds each rank to the current device.
        device = worker_device(config.device)
        dist.init_process_group(backend_for(device), timeout=timedelta(seconds=120))
        summary = train_worker(config)
        dist.barrier()  # every rank done with its collectives before any tears the group down
        return summary
    except Exception as error:
        _log_failure(config, dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0")), error)
        if under_torchrun():
            raise  # torchrun's own launcher reports it
        # Leave without Python printing the traceback again: the launcher sees the exit code
        # and the parent reports the failure once, from the log.
        sys.stderr.flush()
        os._exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
