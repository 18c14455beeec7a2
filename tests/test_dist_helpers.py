"""The test helpers' own behaviour: `run_torchrun` reruns a script once, only for gloo's abort at exit."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dist_helpers import GLOO_EXIT_ABORT, run_torchrun

# Counts its runs in a file, then behaves as the mode given for that run says: "ok" exits 0,
# "abort" prints gloo's exit message and aborts (SIGABRT, as the C++ runtime does), "fail" raises.
SCRIPT = """
import os, sys
runs_file, modes = sys.argv[1], sys.argv[2].split(",")
runs = int(open(runs_file).read()) + 1 if os.path.exists(runs_file) else 1
open(runs_file, "w").write(str(runs))
mode = modes[min(runs, len(modes)) - 1]
print(f"run {runs}: {mode}", flush=True)
if mode == "abort":
    sys.stderr.write(MESSAGE + "\\n")
    sys.stderr.flush()
    os.abort()
if mode == "fail":
    raise SystemExit("failed another way")
"""


def run_script(tmp_path: Path, modes: str):
    runs_file = tmp_path / "runs"
    code = f"MESSAGE = {GLOO_EXIT_ABORT!r}\n{SCRIPT}"
    done = run_torchrun([sys.executable, "-c", code, str(runs_file), modes], timeout=60, env=dict(os.environ))
    return done, int(runs_file.read_text())


@pytest.mark.parametrize(
    "modes, runs, ok",
    [
        ("ok", 1, True),  # a success is not rerun
        ("abort,ok", 2, True),  # gloo's abort at exit once: rerun, and the rerun's result is returned
        ("abort,abort", 2, False),  # twice: returned failed after one rerun, not a third run
        ("fail,ok", 1, False),  # any other failure: returned as it is, never rerun
        ("abort,fail", 2, False),  # the rerun's own failure is the one returned
    ],
)
def test_run_torchrun_reruns_once_only_after_the_gloo_abort_at_exit(tmp_path, modes, runs, ok):
    done, ran = run_script(tmp_path, modes)
    assert ran == runs
    assert (done.returncode == 0) == ok, done.stdout + done.stderr
    assert done.stdout.strip() == f"run {runs}: {modes.split(',')[runs - 1]}"  # the last run's output
    if not ok:
        last = modes.split(",")[runs - 1]
        assert (GLOO_EXIT_ABORT in done.stderr) == (last == "abort")
        assert ("failed another way" in done.stderr) == (last == "fail")
