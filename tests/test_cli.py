"""The command line: demo, train with a config, resume, report, bench, and user errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def gradkit(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "gradkit", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    folder = tmp_path_factory.mktemp("demo")
    return gradkit("demo", "--quick", cwd=folder), folder / "runs" / "demo"


def test_version_and_help():
    done = subprocess.run([sys.executable, "-m", "gradkit", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("gradkit ")
    done = subprocess.run([sys.executable, "-m", "gradkit", "--help"], capture_output=True, text=True)
    assert all(command in done.stdout for command in ("demo", "train", "report", "bench"))


def test_demo_quick_writes_every_artifact(demo_run):
    done, run = demo_run
    assert done.returncode == 0, done.stderr[-3000:]
    for artifact in (
        "tracking.jsonl",
        "report.html",
        "checkpoint/model.pt",
        "checkpoint/rank0.pt",
        "checkpoint/rank1.pt",
        "checkpoint/step.json",
    ):
        assert (run / artifact).exists(), artifact
    assert list(run.glob("events.out.tfevents.*")) or list(run.glob("**/events.out.tfevents.*"))
    assert "2 worker(s)" in done.stdout and "report:" in done.stdout and "x less than the dense gradient" in done.stdout
    if not torch.cuda.is_available():  # auto: the CPU here, and the CPU summary does not mention it
        assert "with 2 worker(s) on cpu:" in done.stdout and "done: 30 steps on 2 worker(s) in" in done.stdout
    assert "training" in done.stderr  # the progress bar


def test_demo_loss_really_drops(demo_run):
    done, _ = demo_run
    line = next(line for line in done.stdout.splitlines() if "validation" in line and "from" in line)
    last, first = (float(v) for v in re.search(r"validation (\S+) \(from (\S+) at step 0\)", line).groups())
    assert last < first - 1.0  # from ~4.8 (uniform over the characters) to well below


def test_train_with_a_config_then_resume_from_its_checkpoint(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    config = write_config(
        tmp_path / "run.toml",
        f"""
name = "tiny"
steps = 6
workers = 1
device = "cpu"
checkpoint_every = 3
eval_every = 3
[data]
text = "{text}"
context = 16
micro_batch = 4
[model]
model = "gru"
width = 32
layers = 1
[optimizer]
optimizer = "sgd"
lr = 0.1
schedule = "cosine"
[compression]
compressor = "none"
[clipping]
clip = "zclip"
""",
    )
    first = gradkit("train", "--config", str(config), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((tmp_path / "runs/tiny/checkpoint/step.json").read_text())["step"] == 6
    again = gradkit("train", "--config", str(config), "--steps", "9", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step 6" in again.stdout and "with 1 worker(s) on cpu:" in again.stdout
    assert json.loads((tmp_path / "runs/tiny/checkpoint/step.json").read_text())["step"] == 9
    assert "done: 3 steps (from step 6 to 9)" in again.stdout  # counts what this session trained
    lines = (tmp_path / "runs/tiny/tracking.jsonl").read_text().count("\n")
    finished = gradkit("train", "--config", str(config), "--steps", "9", cwd=tmp_path)
    assert finished.returncode == 0 and "is complete" in finished.stdout, finished.stderr[-3000:]
    assert (tmp_path / "runs/tiny/tracking.jsonl").read_text().count("\n") == lines
    refused = gradkit("train", "--config", str(config), "--fresh", "--workers", "500", cwd=tmp_path, timeout=60)
    assert refused.returncode == 2 and "more than this machine can use" in refused.stderr
    assert json.loads((tmp_path / "runs/tiny/checkpoint/step.json").read_text())["step"] == 9  # checked before removing
    fresh = gradkit("train", "--config", str(config), "--fresh", cwd=tmp_path)
    assert fresh.returncode == 0 and "starting 'tiny'" in fresh.stdout, fresh.stderr[-3000:]
    assert "done: 6 steps on 1 worker(s)" in fresh.stdout


def test_demo_run_again_is_complete_and_writes_nothing(demo_run):
    done, run = demo_run
    assert done.returncode == 0, done.stderr[-3000:]
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    again = gradkit("demo", "--quick", cwd=run.parent.parent)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "run 'demo' is complete" in again.stdout and "report: runs/demo/report.html" in again.stdout
    assert "validation" in again.stdout  # the last session's summary
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()} == before
    assert (run / "report.html").stat().st_mode & 0o777 == (run / "tracking.jsonl").stat().st_mode & 0o777


def test_unnamed_config_gets_its_own_run_and_a_mismatch_is_one_line(demo_run, tmp_path):
    _, run = demo_run
    folder = run.parent.parent
    marker = (run / "checkpoint/step.json").read_text()
    model = (run / "checkpoint/model.pt").read_bytes()
    config = write_config(folder / "wide.toml", "width = 64\nsteps = 2\nworkers = 1\ncompressor = 'none'\n")
    done = gradkit("train", "--config", str(config), cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting 'wide'" in done.stdout and (folder / "runs/wide/checkpoint/step.json").exists()
    named = write_config(folder / "named.toml", "name = 'demo'\nwidth = 64\nsteps = 40\n")
    refused = gradkit("train", "--config", str(named), cwd=folder, timeout=60)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().count("\n") == 0  # one line
    assert "width = 96" in refused.stderr and "width = 64" in refused.stderr and "starting" not in refused.stdout
    assert (run / "checkpoint/step.json").read_text() == marker and (run / "checkpoint/model.pt").read_bytes() == model


def test_a_failing_worker_is_one_line_with_the_traceback_in_the_run_folder(tmp_path):
    first = gradkit("demo", "--steps", "2", "--name", "broken", "--workers", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / "runs/broken/checkpoint/rank0.pt").write_bytes(b"not a checkpoint")
    done = gradkit("demo", "--steps", "3", "--name", "broken", "--workers", "1", cwd=tmp_path)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "worker 0 failed" in errors[0] and "runs/broken/error.log" in errors[0]
    assert "Traceback" not in done.stderr
    assert "Traceback (most recent call last)" in (tmp_path / "runs/broken/error.log").read_text()
    verbose = gradkit("demo", "--steps", "3", "--name", "broken", "--workers", "1", "--verbose", cwd=tmp_path)
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr


def test_report_command_rebuilds_the_page(demo_run, tmp_path):
    _, run = demo_run
    out = tmp_path / "page.html"
    done = gradkit("report", str(run), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert out.read_text().count("<img") >= 4


def test_bench_quick_runs_the_harness(tmp_path):
    out = tmp_path / "bench.md"
    # The whole harness runs in tests/test_benchmarks.py (tiny shapes); here, that the CLI reaches it.
    done = gradkit("bench", "--quick", "--tiny", "--only", "clipping,topk", "--out", str(out), cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|" in out.read_text()


@pytest.mark.parametrize(
    "config, words",
    [
        ("stepz = 5", "unknown config key 'stepz'; did you mean 'steps'?"),
        ("steps = 'many'", "steps must be an integer, got a string 'many'"),
        ("compressor = 'topkk'", "did you mean 'topk'?"),
        ("density = 1.5", "density must be in (0, 1]"),
        ("momentum = 1.0", "momentum must be in [0, 1)"),
        ("optimizer = 'adam'", "did you mean 'adamw'?"),
        ("sparse_values = 'fp16'", "sparse_values must be one of float32, float16, bfloat16"),
        ("text = 'missing.txt'", "does not exist"),
        ("text = 'empty.txt'", "is empty"),
        ("workers = 500", "more than this machine can use"),
        ("steps = [", "not valid TOML"),
        ("device = 'gpu'", "device must be one of auto, cpu, cuda; got 'gpu'"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, config, words):
    (tmp_path / "empty.txt").write_text("")
    path = write_config(tmp_path / "bad.toml", config + "\n")
    done = gradkit("train", "--config", str(path), cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert words in done.stderr
    assert "Traceback" not in done.stderr
    assert "starting" not in done.stdout  # no banner before the error


def test_missing_config_and_unwritable_run_dir(tmp_path):
    done = gradkit("train", "--config", str(tmp_path / "nope.toml"), cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "does not exist" in done.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = gradkit("demo", "--quick", "--run-dir", str(blocker / "runs"), cwd=tmp_path, timeout=60)
    assert (
        done.returncode == 2 and "cannot write to the run directory" in done.stderr and "Traceback" not in done.stderr
    )


def test_report_on_a_directory_without_a_run(tmp_path):
    done = gradkit("report", str(tmp_path), cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_ctrl_c_stops_cleanly_and_keeps_the_checkpoint(tmp_path):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gradkit", "demo", "--steps", "2000", "--name", "stopped"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    marker = tmp_path / "runs/stopped/tracking.jsonl"
    deadline = time.monotonic() + 120
    while not (marker.exists() and marker.stat().st_size > 2000) and time.monotonic() < deadline:
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    step = json.loads((tmp_path / "runs/stopped/checkpoint/step.json").read_text())["step"]
    assert 0 < step < 2000


needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without CUDA")


@needs_no_cuda
@pytest.mark.parametrize("how", ["flag", "config"])
def test_device_cuda_without_cuda_is_one_line_before_anything_starts(tmp_path, how):
    if how == "flag":
        done = gradkit("demo", "--quick", "--device", "cuda", cwd=tmp_path, timeout=60)
    else:
        config = write_config(tmp_path / "gpu.toml", "device = 'cuda'\n")
        done = gradkit("train", "--config", str(config), cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0  # one line
    assert "--device cuda: torch.cuda.is_available() is False" in done.stderr
    assert f"torch {torch.__version__}" in done.stderr
    assert "pass --device cpu" in done.stderr
    assert not (tmp_path / "runs").exists()  # refused before the run folder was made


def test_device_flag_takes_only_known_values(tmp_path):
    done = gradkit("demo", "--device", "gpu", cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "invalid choice: 'gpu'" in done.stderr


def test_more_workers_than_gpus_is_one_line(tmp_path, monkeypatch, capsys):
    """Seen from the command: two GPUs, three workers (nothing runs on the pretended GPUs: the check comes first)."""
    from gradkit import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--quick", "--device", "cuda", "--workers", "3"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "gradkit demo: error: --device cuda with 3 workers on this machine needs 3 GPUs (one per worker)" in err
    assert "found 2; pass --workers 2" in err


@pytest.mark.cuda
def test_demo_on_cuda_end_to_end_and_resume_across_devices(tmp_path):
    """On a GPU: the quick demo trains on CUDA, then the run resumes on the CPU and back on CUDA."""
    done = gradkit("demo", "--quick", "--device", "cuda", "--workers", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "with 1 worker(s) on cuda (one GPU per worker):" in done.stdout
    assert re.search(r"done: 30 steps on 1 worker\(s\) on cuda:0 \(.+\) in \d+ s", done.stdout), done.stdout
    last, first = (float(v) for v in re.search(r"validation (\S+) \(from (\S+) at step 0\)", done.stdout).groups())
    assert last < first - 1.0
    run = tmp_path / "runs/demo"
    assert json.loads((run / "checkpoint/step.json").read_text())["step"] == 30 and (run / "report.html").exists()
    cpu = gradkit("demo", "--quick", "--device", "cpu", "--workers", "1", "--steps", "35", cwd=tmp_path)
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    assert "resuming at step 30" in cpu.stdout and "done: 5 steps (from step 30 to 35) on 1 worker(s) in" in cpu.stdout
    back = gradkit("demo", "--quick", "--device", "cuda", "--workers", "1", "--steps", "40", cwd=tmp_path)
    assert back.returncode == 0, back.stderr[-3000:]
    assert "resuming at step 35" in back.stdout and "on cuda:0" in back.stdout


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_demo_on_two_gpus_with_nccl(tmp_path):
    done = gradkit("demo", "--quick", "--device", "cuda", "--workers", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: 30 steps on 2 worker(s) on cuda:0" in done.stdout and "x less than the dense gradient" in done.stdout
