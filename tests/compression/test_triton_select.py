"""The Triton selection kernels, checked on a CPU by Triton's interpreter in a child pytest.

``TRITON_INTERPRET=1`` must be set before Triton is imported, and it would also send a GPU's
own kernels through the interpreter, so the checks (triton_interpreted.py) run in a child
process of their own. Skipped where Triton is not installed; tests/test_cuda.py runs the
kernels on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_triton_kernels_match_torch_under_the_interpreter():
    checks = Path(__file__).with_name("triton_interpreted.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]
