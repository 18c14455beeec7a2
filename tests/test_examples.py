"""The examples run as documented (small sizes) and do what they say."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from dist_helpers import run_torchrun

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(*args: str, timeout: float = 180) -> str:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = run_torchrun([sys.executable, *args], timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def run_on_two_processes(example: str, *args: str) -> str:
    return run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLES / example), *args)


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_examples_are_short(example):
    lines = (EXAMPLES / example).read_text().splitlines()
    assert len(lines) < 40, f"{example} has {len(lines)} lines; a complete loop per feature fits in under 40"


def test_accumulation_example():
    out = run(str(EXAMPLES / "accumulation.py"), "--steps", "50")
    assert re.search(r"step 50: loss/token [\d.]+, tokens in window \d+", out)


def test_clipping_example_tames_the_spike():
    out = run(str(EXAMPLES / "clipping.py"), "--steps", "40")
    before, after = map(float, re.search(r"step 37: norm ([\d.]+) -> ([\d.]+)", out).groups())
    assert before > 10 * after and after <= 1.0 + 1e-3


def test_compression_example_converges():
    out = run(str(EXAMPLES / "compression.py"), "--steps", "120")
    losses = [float(v) for v in re.findall(r"loss ([\d.]+)", out)]
    assert losses[-1] < 0.7 * losses[0]


def test_averaging_example_under_torchrun():
    out = run_on_two_processes("averaging.py", "--steps", "10", "--compressor", "topk")
    # The two ranks share the pipe: one's line may run into the other's, so match the number exactly.
    checksums = re.findall(r"rank (\d): done, parameter checksum (-?\d+\.\d{6})", out)
    assert sorted(rank for rank, _ in checksums) == ["0", "1"]
    assert checksums[0][1] == checksums[1][1]  # the replicas agree


def test_tracking_example_names_the_vanishing_layer(tmp_path):
    out = run(str(EXAMPLES / "tracking.py"), "--steps", "40", "--log-dir", str(tmp_path / "run"))
    assert "vanishing in 0" in out  # the first layer of the sigmoid stack
    assert (tmp_path / "run" / "tracking.jsonl").exists()


def test_fsdp_example_under_torchrun():
    out = run_on_two_processes("fsdp.py", "--steps", "20", "--reduce", "boundary")
    done = re.findall(r"rank (\d): done, grad norm (\d+\.\d{6}), parameter checksum (-?\d+\.\d{6})", out)
    assert sorted(rank for rank, _, _ in done) == ["0", "1"]
    assert done[0][1:] == done[1][1:]  # every rank reports the full norm and the full parameters
    losses = [float(v) for v in re.findall(r"loss/item ([\d.]+)", out)]
    assert losses and losses[-1] < losses[0]
