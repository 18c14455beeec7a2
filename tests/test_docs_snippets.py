"""Every fenced ```python block of README.md and docs/*.md runs as written.

A block whose first line is ``# ... run with: torchrun --nproc_per_node N ...`` is
run that way, on N local processes. A block that is only a fragment of a larger
program says so in its first line, ``# fragment: <what it needs>``, visible to
the reader; those are the only ones not run, and they are few.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path

import pytest

from dist_helpers import run_torchrun

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
TORCHRUN = re.compile(r"run with: torchrun --nproc_per_node (\d+)")
MAX_FRAGMENTS = 5


def blocks() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for i, match in enumerate(FENCE.finditer(path.read_text(encoding="utf-8")), 1):
            found.append((f"{path.relative_to(ROOT)}#{i}", match.group(1)))
    return found


def is_fragment(code: str) -> bool:
    return code.lstrip().startswith("# fragment:")


def test_the_docs_have_python_blocks_and_few_fragments():
    found = blocks()
    assert len(found) >= 10
    fragments = [name for name, code in found if is_fragment(code)]
    assert len(fragments) <= MAX_FRAGMENTS, fragments


@pytest.mark.parametrize("name, code", blocks(), ids=[name for name, _ in blocks()])
def test_block_runs_as_written(name, code, tmp_path, monkeypatch):
    if is_fragment(code):
        pytest.skip(f"{name} is marked as a fragment: {code.lstrip().splitlines()[0]}")
    monkeypatch.chdir(tmp_path)  # blocks write runs/exp1 and the like
    torchrun = TORCHRUN.search(code.splitlines()[0])
    if torchrun:
        script = tmp_path / "snippet.py"
        script.write_text(code)
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        processes = torchrun.group(1)
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            processes,
            str(script),
        ]
        done = run_torchrun(command, timeout=180, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        out = done.stdout
    else:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(code, name, "exec"), {"__name__": "__main__"})
        out = buffer.getvalue()
    # The blocks print the claims they make ("equal to the full-batch step: True"); one printed as
    # False means the docs are wrong.
    assert not re.search(r"(?<!['\"]):\s*False\b", out), out  # not a dict's 'skipped': False
