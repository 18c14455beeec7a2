"""Run a test function on several real processes joined in one torch.distributed group.

    results = run_workers(fn, 2, arg1, arg2)   # fn(rank, world_size, arg1, arg2) on each rank

`fn` must be importable by the spawned children (a module-level function in a
test module or here), and its return value must be picklable by `torch.save`.
Each worker joins a process group (gloo by default) through a `file://`
rendezvous in a fresh temporary folder, with a timeout on every collective.
The parent never hangs: it waits up to `timeout` seconds, then kills every
worker and raises `TimeoutError`. A worker's exception comes back as a
`WorkerError` that carries the worker's traceback text (every failed rank's,
the earliest first: a peer of a crashed rank fails too, with a less useful error).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["WorkerError", "run_workers"]


class WorkerError(RuntimeError):
    """A worker process failed; the message holds its rank and traceback (or exit status)."""

    def __init__(self, message: str, rank: int | None) -> None:
        super().__init__(message)
        self.rank = rank


def run_workers(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    backend: str = "gloo",
    pg_timeout: float = 30.0,
    threads: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on `world_size` spawned processes.

    Args:
        fn: a module-level function; it runs after the process group is initialized
            and before it is destroyed, and its return value is that rank's result.
        world_size: number of processes (ranks 0 .. world_size - 1).
        *args: passed on to `fn` (picklable).
        timeout: seconds to wait for all workers, start-up included.
        backend: the torch.distributed backend ("gloo" runs anywhere).
        pg_timeout: timeout of the process group's collectives, in seconds.
        threads: torch intra-op threads per worker (1 avoids oversubscribing small machines).

    Returns:
        The results, indexed by rank.

    Raises:
        WorkerError: a worker raised or exited abnormally; the others are stopped.
        TimeoutError: the workers did not finish in `timeout` seconds; all are killed.
    """
    with tempfile.TemporaryDirectory(prefix="gradkit-dist-") as tmp:
        folder = Path(tmp)
        context = mp.start_processes(
            _worker,
            args=(fn, world_size, args, str(folder), backend, pg_timeout, threads),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        try:
            _join(context, time.monotonic() + timeout, timeout, folder)
        finally:
            _kill_alive(context)
        results = []
        for rank in range(world_size):
            path = folder / f"result-{rank}.pt"
            if not path.exists():
                raise WorkerError(f"rank {rank} exited without writing a result", rank)
            results.append(torch.load(path, weights_only=False))
        return results


def _join(context: mp.ProcessContext, deadline: float, timeout: float, folder: Path) -> None:
    try:
        while not context.join(timeout=max(0.0, min(0.5, deadline - time.monotonic())), grace_period=2.0):
            if time.monotonic() >= deadline:
                pids = [p.pid for p in context.processes if p.is_alive()]
                _kill_alive(context)
                raise TimeoutError(
                    f"workers did not finish within {timeout} s; killed the ones still running (pids {pids})"
                )
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
        # When one rank dies its peers fail too ("connection closed"); the earliest
        # failure is the cause, so it comes first and names the rank.
        failures = sorted(_read_failures(folder))
        if not failures:
            raise WorkerError(f"rank {error.error_index}: {error}", error.error_index) from None
        first_rank = failures[0][1]
        report = "\n".join(f"--- rank {rank} ---\n{trace}" for _, rank, trace in failures)
        raise WorkerError(f"rank {first_rank} failed first:\n{report}", first_rank) from None


def _read_failures(folder: Path) -> list[tuple[float, int, str]]:
    failures = []
    for path in folder.glob("error-*.txt"):
        stamp, _, trace = path.read_text().partition("\n")
        failures.append((float(stamp), int(path.stem.split("-")[1]), trace))
    return failures


def _kill_alive(context: mp.ProcessContext) -> None:
    for process in context.processes:
        if process.is_alive():
            process.kill()
    for process in context.processes:
        process.join(timeout=5)


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...],
    folder: str,
    backend: str,
    pg_timeout: float,
    threads: int,
) -> None:
    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        # Gloo binds to the host name's interface by default; on one machine loopback always works.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{os.path.join(folder, 'rendezvous')}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout),
        )
    except BaseException:
        _record_failure(folder, rank)
        raise
    try:
        result = fn(rank, world_size, *args)
    except BaseException:
        _record_failure(folder, rank)  # before the group goes down and fails the peers
        raise
    finally:
        dist.destroy_process_group()
    # Write to a temporary name first so that the parent never reads a partial file.
    partial = os.path.join(folder, f"result-{rank}.pt.partial")
    torch.save(result, partial)
    os.replace(partial, os.path.join(folder, f"result-{rank}.pt"))
    # The result is saved: skip interpreter teardown, where a gloo thread still holding
    # finished work can abort the process (SIGABRT) after everything succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _record_failure(folder: str, rank: int) -> None:
    Path(folder, f"error-{rank}.txt").write_text(f"{time.time()!r}\n{traceback.format_exc()}")


# gloo on CPU can abort a torchrun worker at interpreter exit, after its work is done and its group
# destroyed. The cause (from a core dump of examples/fsdp.py): a gloo worker thread ("pt_gloo_runloop")
# drops the last reference to a finished work (the final barrier, which holds the FSDP all-gathers still
# in flight when it was queued); freeing their tensors takes the GIL, and a thread that asks for the GIL
# while the interpreter finalizes is ended by CPython (pthread_exit) inside that C++ destructor:
# std::terminate. It can only happen where the group's threads outlive destroy_process_group(), i.e.
# something else still holds the group: torch's FSDP2 (even once the model is freed) and DDP inside the
# HF Trainer and Lightning do. Where only gradkit holds it (examples/averaging.py, the `gradkit train`/`demo`
# workers), destroy_process_group() joins gloo's worker threads, and averaging.py never aborted (0 of 60
# runs, against 1 of 60 for fsdp.py, on the loaded 2-core machine). A script cannot end the threads of a
# group torch still holds short of os._exit, so the FSDP and Trainer runs keep this one rerun.
GLOO_EXIT_ABORT = "terminate called without an active exception"


def run_torchrun(
    command: list[str], *, timeout: float, env: dict[str, str], cwd: str | Path | None = None
) -> subprocess.CompletedProcess:
    """Run a multi-process command (torchrun, or a trainer that starts its own ranks); once more if it
    failed only by gloo's abort at exit (see GLOO_EXIT_ABORT).

    A second failure, or any other failure, is returned as it is for the caller to assert on."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if done.returncode != 0 and GLOO_EXIT_ABORT in done.stderr:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    return done
