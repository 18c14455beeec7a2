"""Elastic restart: a worker SIGKILLed mid-run under torch.distributed.run --max-restarts=1;
the job restarts, resumes from its last atomic checkpoint, and ends with exactly the
parameters of an uninterrupted run (tests/elastic_worker.py is the training script)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
LIMIT = 240  # seconds per job, start-up and restart included


def launch(out: Path, kill_at: int | None) -> subprocess.Popen:
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--max-restarts=1", "--monitor-interval=0.5", str(HERE / "elastic_worker.py"), str(out)]  # fmt: skip
    if kill_at is not None:
        command += ["--kill-at", str(kill_at)]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    # A session of its own, so that a timeout kills the launcher and every worker together.
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(process: subprocess.Popen) -> str:
    try:
        output, _ = process.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the job did not finish in {LIMIT} s; killed it:\n{output[-4000:]}") from None
    assert process.returncode == 0, output[-4000:]
    return output


def test_killed_worker_restarts_resumes_and_ends_bit_identical(tmp_path):
    kill_at = 5  # the first micro-step of a window: the checkpoint before it is mid-window
    jobs = {"straight": launch(tmp_path / "straight", None), "killed": launch(tmp_path / "killed", kill_at)}
    try:
        outputs = {name: finish(job) for name, job in jobs.items()}
    finally:
        for job in jobs.values():
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    killed = tmp_path / "killed"
    assert (killed / "killed").exists(), outputs["killed"][-2000:]  # the worker really died
    for rank in (0, 1):
        starts = (killed / f"starts-rank{rank}.txt").read_text().split("\n")[:-1]
        assert starts == ["0 0", f"{kill_at} 1"], starts  # first start, then restart 1 resumed at the kill
        straight = torch.load(tmp_path / "straight" / f"params-rank{rank}.pt", weights_only=True)
        resumed = torch.load(killed / f"params-rank{rank}.pt", weights_only=True)
        for a, b in zip(straight, resumed):
            assert torch.equal(a, b)
    assert (tmp_path / "straight" / "starts-rank0.txt").read_text() == "0 0\n"
