"""The code's layout and lint are checked like its behaviour: `ruff format` and `ruff check`
(configured in pyproject.toml, lines within 120 characters) over the whole checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' brings it)")
    return [found]


@pytest.mark.parametrize("check", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_ruff_is_clean(check):
    done = subprocess.run([*_ruff(), *check, "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"ruff {' '.join(check)} found problems:\n{done.stdout}{done.stderr}"
