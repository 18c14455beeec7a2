"""The benchmark harness (gradkit.bench, `gradkit bench`, benchmarks/run.py) runs end to end and prints a
well-formed table (no timing thresholds); its options and errors are the same from both entry points."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradkit
from gradkit.bench import processes
from gradkit.bench.run import BENCHMARKS

ROOT = Path(__file__).resolve().parents[1]
NAMES = [
    "clipping", "step", "tracking", "topk", "compressors", "averaging", "network", "hierarchical", "quality", "memory",
    "ef_memory", "ema", "powersgd", "fsdp", "integrations",
]  # fmt: skip
# The benchmarks that start worker processes or a trainer of their own run in a test of their own.
PROCESS_HEAVY = ["ema", "powersgd", "fsdp", "integrations", "hierarchical"]


def _table(report: str) -> list[dict[str, str]]:
    lines = [line for line in report.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def test_quick_run_prints_one_table_with_finite_ratios(tmp_path):
    out = tmp_path / "results.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--tiny", "--threads", "1", "--out", str(out),
         "--only", ",".join(name for name in NAMES if name not in PROCESS_HEAVY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
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


def test_the_newer_rows_run_against_their_own_anchors(tmp_path):
    harness = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--tiny", "--threads", "1"]
    done = subprocess.run([*harness, "--only", ",".join(PROCESS_HEAVY)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = _table(done.stdout)
    anchors = {
        "EMA.update": "AveragedModel.update_parameters",
        "Average(PowerSGD(": "DDP + powerSGD_hook",
        "HF Trainer step": "Trainer without callback",
        "FSDP2 pipeline step": "hand-written FSDP2 loop",
        "Average(node_size=": "flat Average()",
        "Average(TopK(0.01), node_size=": "flat Average()",
    }
    for prefix, reference in anchors.items():
        found = [row for row in rows if row["benchmark"].startswith(prefix)]
        if not found and prefix.endswith("node_size=") and "1 Gbit/s link [cpu]: skipped" in done.stdout:
            continue  # the two-node rows need root and iproute2
        assert found and all(row["reference"].startswith(reference) for row in found), (prefix, rows)
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
    harness = [
        sys.executable,
        str(ROOT / "benchmarks" / "run.py"),
        "--quick",
        "--tiny",
        "--threads",
        "1",
        "--only",
        "quality",
    ]
    done = subprocess.run([*harness, "--quality-steps", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = _table(done.stdout)
    assert len(rows) == 2 and all(", 3 steps, 2 workers" in row["benchmark"] for row in rows)
    # rank 0's progress bar passes through to the harness's stderr, once per training run
    assert done.stderr.count("3/3") >= 3, done.stderr[-2000:]
    bad = subprocess.run([*harness, "--quality-steps", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--quality-steps must be >= 1, got 0" in bad.stderr


def test_a_shown_worker_that_fails_points_to_its_stderr(capfd):
    with pytest.raises(RuntimeError, match=r"worker 0 \(exit 2; its stderr is above\)"):
        processes.run_workers([(["no-such-benchmark"], {})], timeout=60, show=0)
    assert "no-such-benchmark" in capfd.readouterr().err  # argparse's message reached the terminal


def test_workers_import_the_same_gradkit_as_the_harness():
    home = str(Path(gradkit.__file__).resolve().parents[1])
    env = processes.same_gradkit_env({"PATH": "/bin", "PYTHONPATH": "/elsewhere"})
    found = subprocess.run(
        [sys.executable, "-c", "import gradkit; print(gradkit.__file__)"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).resolve() == Path(gradkit.__file__).resolve()
    if env.get("PYTHONPATH"):  # not installed in site-packages: its folder goes first, the caller's path stays
        assert env["PYTHONPATH"].split(os.pathsep) == [home, "/elsewhere"]


def _gradkit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gradkit", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_bench_help_lists_every_option_and_every_benchmark(tmp_path):
    assert list(BENCHMARKS) == NAMES
    cli = _gradkit("bench", "--help", cwd=tmp_path)
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--help"]
    harness = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and harness.returncode == 0, cli.stderr + harness.stderr
    options = {"--quick", "--out", "--threads", "--tiny", "--only", "--quality-steps"}
    for help_text in (cli.stdout, harness.stdout):
        listed = {word.rstrip(",") for word in help_text.split() if word.startswith("--")}
        assert options | {"--help"} <= listed, listed
        only_help = " ".join(help_text.split()).split("--only NAMES", 2)[-1]
        assert all(name in only_help for name in NAMES), only_help
    # the harness accepts exactly the options `gradkit bench` lists
    cli_listed = {word.rstrip(",") for word in cli.stdout.split() if word.startswith("--")}
    harness_listed = {word.rstrip(",") for word in harness.stdout.split() if word.startswith("--")}
    assert cli_listed == harness_listed


@pytest.mark.parametrize("argv, words", [
    (["--only", "foo"], "--only: unknown benchmark 'foo'; choose from " + ", ".join([*NAMES, "gpu"])),
    (["--only", ","], "--only: unknown benchmark ','; choose from"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
])  # fmt: skip
def test_bench_bad_options_are_one_line_before_anything_runs(tmp_path, argv, words):
    done = _gradkit("bench", *argv, "--out", str(tmp_path / "never.md"), cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gradkit bench: error: {words}"), done.stderr
    assert done.stdout == "" and not (tmp_path / "never.md").exists()


def test_gradkit_bench_runs_from_any_folder_and_names_its_command(tmp_path):
    out = tmp_path / "clipping.md"
    argv = ["bench", "--quick", "--tiny", "--threads", "1", "--only", "clipping", "--out", str(out)]
    done = _gradkit(*argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"command: gradkit bench --quick --tiny --threads 1 --only clipping --out {out}" in done.stdout
    rows = _table(done.stdout)
    assert rows and all(row["benchmark"].startswith("clip_grad_norm_") for row in rows)
    assert out.read_text().strip() == done.stdout.strip()
