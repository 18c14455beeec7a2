"""Start benchmark worker processes and collect their JSON results, never hanging.

Each worker is `python -m gradkit.bench.worker ... --out FILE` (optionally behind a
prefix such as ``ip netns exec NS``) in its own session, so that on a timeout
the whole process group it started (gloo threads, a shell of `ip netns exec`)
is killed, not just the first process.
"""

from __future__ import annotations

import json
import os
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import gradkit

__all__ = ["WORKER", "free_port", "run_workers"]

WORKER = ("-m", "gradkit.bench.worker")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(
    commands: list[tuple[list[str], dict[str, str]]], timeout: float, *, show: int | None = None
) -> list[dict[str, Any]]:
    """Run `gradkit.bench.worker` once per (arguments, extra environment), all at once; each one's JSON result.

    `arguments` may start with a prefix ending in ``--`` (e.g. ``["ip", "netns", "exec", NS, "--"]``);
    what follows the ``--`` goes to the worker. The worker at index `show` writes its stderr (e.g. a
    progress bar) to this process's stderr instead of into the captured output.

    Raises:
        RuntimeError: a worker exited with an error (its output's tail is in the message).
        TimeoutError: the workers did not all finish within `timeout` seconds (all are killed).
    """
    with tempfile.TemporaryDirectory(prefix="gradkit-bench-") as folder:
        processes, outs = [], []
        try:
            for index, (arguments, env) in enumerate(commands):
                prefix, args = _split(arguments)
                out = Path(folder, f"result-{index}.json")
                outs.append(out)
                command = [*prefix, sys.executable, *WORKER, *args, "--out", str(out)]
                # One thread per worker: the workers share the machine's cores.
                environment = {**same_gradkit_env(os.environ), "OMP_NUM_THREADS": "1", **env}
                processes.append(
                    subprocess.Popen(
                        command,
                        env=environment,
                        stdout=subprocess.PIPE,
                        stderr=None if index == show else subprocess.STDOUT,
                        text=True,
                        start_new_session=True,
                    )
                )
            deadline = time.monotonic() + timeout
            outputs = []
            for process in processes:
                try:
                    outputs.append(process.communicate(timeout=max(0.1, deadline - time.monotonic()))[0])
                except subprocess.TimeoutExpired:
                    raise TimeoutError(
                        f"benchmark workers did not finish within {timeout:.0f} s; killed them"
                    ) from None
        finally:
            for process in processes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.communicate()
        failed = [(i, p.returncode, out) for i, (p, out) in enumerate(zip(processes, outputs)) if p.returncode != 0]
        if failed:
            # A peer of a crashed worker fails too; every failure's tail is shown, in order.
            # The shown worker's stderr (its traceback) went to the terminal, above this message.
            detail = "\n".join(
                f"--- worker {i} (exit {rc}{'; its stderr is above' if i == show else ''}) ---\n{out[-2000:]}"
                for i, rc, out in failed
            )
            raise RuntimeError(f"benchmark worker failed:\n{detail}")
        return [json.loads(out.read_text()) for out in outs]


def same_gradkit_env(environ: dict[str, str]) -> dict[str, str]:
    """The environment with which a worker imports this very gradkit (a checkout's src/ or an installed one)."""
    home = str(Path(gradkit.__file__).resolve().parents[1])
    if home in {str(Path(p).resolve()) for p in site.getsitepackages()}:
        return dict(environ)  # installed: found without help (and site-packages must not go ahead of the stdlib)
    return {**environ, "PYTHONPATH": os.pathsep.join(filter(None, [home, environ.get("PYTHONPATH")]))}


def _split(arguments: list[str]) -> tuple[list[str], list[str]]:
    if "--" in arguments:
        cut = arguments.index("--")
        return arguments[:cut], arguments[cut + 1 :]
    return [], arguments
