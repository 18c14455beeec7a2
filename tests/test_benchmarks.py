"""The benchmark harness runs end to end and prints a well-formed table (no timing thresholds)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _table(report: str) -> list[dict[str, str]]:
    lines = [line for line in report.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def test_quick_run_prints_one_table_with_finite_ratios(tmp_path):
    out = tmp_path / "results.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--tiny", "--threads", "1", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_text().strip() == result.stdout.strip()
    assert result.stdout.startswith("machine: CPU: ")
    assert sum(line.startswith("| benchmark |") for line in result.stdout.splitlines()) == 1

    rows = _table(result.stdout)
    clipping = [row for row in rows if row["benchmark"].startswith("clip_grad_norm_")]
    cpu = {row["benchmark"] for row in clipping if row["device"] == "cpu"}
    assert any(name.startswith("clip_grad_norm_, tiny GPT-2") for name in cpu)
    assert any(name.endswith("one-element grads (per-call overhead)") for name in cpu)
    assert {row["reference"] for row in clipping} == {"torch foreach"}
    on_gpu = [row for row in clipping if row["device"] != "cpu"]
    if torch.cuda.is_available():
        assert len(on_gpu) == len(cpu)
    else:
        assert on_gpu == []
        assert "[cuda]: skipped" in result.stdout
    # Every other benchmark is measured against its own anchor; the two-host rows may be
    # skipped (they need root and iproute2), the others always run.
    anchors = {
        "TopK(0.01": "torch.topk(x.abs(), k)",
        "Average() step": "DDP",
        "Average(TopK(0.01))": "dense Average()",
        "training quality: ": "dense Average()",
        "accumulation K=": "full batch (K=1)",
    }
    for prefix, reference in anchors.items():
        found = [row for row in rows if row["benchmark"].startswith(prefix)]
        assert found or (prefix == "Average(TopK(0.01))" and "1 Gbit/s link [cpu]: skipped" in result.stdout), prefix
        assert {row["reference"] for row in found} <= {reference}, (prefix, found)
    for row in rows:
        ratio = float(row["reference / gradkit"])
        assert math.isfinite(ratio) and ratio > 0, row


def test_only_runs_the_named_benchmarks_and_rejects_unknown_names():
    harness = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--tiny", "--threads", "1"]
    done = subprocess.run([*harness, "--only", "topk"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = _table(done.stdout)
    assert rows and all(row["benchmark"].startswith("TopK(") for row in rows)
    bad = subprocess.run([*harness, "--only", "topk,netwrk"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "unknown benchmark 'netwrk'" in bad.stderr and "network" in bad.stderr


def test_only_gpu_runs_the_cuda_rows_or_says_there_is_no_gpu():
    harness = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--tiny", "--threads", "1"]
    done = subprocess.run([*harness, "--only", "gpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if torch.cuda.is_available():
        rows = _table(done.stdout)
        assert rows and all(row["device"] != "cpu" for row in rows)
        assert any(row["benchmark"].startswith("TopK(0.01, exactly_k=True)") for row in rows)
    else:
        assert done.stdout.strip() == (
            "--only gpu: no CUDA GPU here (torch.cuda.is_available() is False); no CUDA row was run"
        )


def test_quality_steps_sets_the_length_of_the_quality_runs():
    harness = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--tiny", "--threads", "1", "--only", "quality"]
    done = subprocess.run([*harness, "--quality-steps", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = _table(done.stdout)
    assert len(rows) == 2 and all(", 3 steps, 2 workers" in row["benchmark"] for row in rows)
    # rank 0's progress bar passes through to the harness's stderr, once per training run
    assert done.stderr.count("3/3") >= 3, done.stderr[-2000:]
    bad = subprocess.run([*harness, "--quality-steps", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--quality-steps must be >= 1, got 0" in bad.stderr


def test_a_shown_worker_that_fails_points_to_its_stderr(capfd):
    spec = importlib.util.spec_from_file_location("bench_processes", ROOT / "benchmarks" / "processes.py")
    processes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(processes)
    with pytest.raises(RuntimeError, match=r"worker 0 \(exit 2; its stderr is above\)"):
        processes.run_workers([(["no-such-benchmark"], {})], timeout=60, show=0)
    assert "no-such-benchmark" in capfd.readouterr().err  # argparse's message reached the terminal
