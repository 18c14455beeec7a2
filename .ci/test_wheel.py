"""The built wheel, as a user meets it: installed in a fresh virtual environment, run from outside the checkout.

    .venv/bin/python -m pytest .ci/test_wheel.py      (CI runs it after the test suite)

The wheel is built from a clean copy of the checkout (no build/ left over from an
earlier build can leak stale modules into it). PyTorch is pinned to the version of
the environment running this test (``GRADKIT_WHEEL_TORCH`` overrides it), so pip takes
it from its cache or find-links, where the checkout's set-up left it: nothing large is
downloaded twice.
First without extras (the demo, the benchmarks, every public name), then with
``[viz]`` added (the report).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = os.environ.get("GRADKIT_WHEEL_TORCH", f"torch=={version('torch').split('+')[0]}")
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "src" / "gradkit" / "_version.py").read_text())[1]
# Never part of a released package: the checkout's tests, benchmark results, caches and build leftovers.
FORBIDDEN = re.compile(
    r"(^|/)(tests?|benchmarks|runs|build|dist|\.venv|\.git|__pycache__|\.pytest_cache|\.hypothesis)/"
    r"|\.pyc$|\.egg-info|RESULTS\.md$|\.jsonl$"
)


class Installed:
    """A fresh virtual environment holding the wheel, and a folder outside the checkout to run it in."""

    def __init__(self, folder: Path):
        self.wheel = _build(folder / "dist")
        self.venv = folder / "venv"
        self.work = folder / "work"
        self.work.mkdir()
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
        self.pip("install", "--quiet", TORCH, str(self.wheel))

    def env(self) -> dict[str, str]:
        # Nothing from the checkout: no PYTHONPATH, no virtual environment of the caller.
        drop = {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP"}
        env = {k: v for k, v in os.environ.items() if k not in drop}
        return {**env, "PATH": f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "OMP_NUM_THREADS": "1",
                "GLOO_SOCKET_IFNAME": env.get("GLOO_SOCKET_IFNAME", "lo")}  # fmt: skip

    def pip(self, *args: str) -> None:
        command = [str(self.venv / "bin" / "python"), "-m", "pip", *args]
        done = subprocess.run(
            command, cwd=self.work, env=self.env(), check=False, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    def run(self, *command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        program = str(self.venv / "bin" / command[0])
        return subprocess.run([program, *command[1:]], cwd=self.work, env=self.env(), check=False, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip


def _build(dist: Path) -> Path:
    """Build the wheel from a clean copy of the checkout's sources; its path."""
    source = dist.parent / "source"
    junk = shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "*.egg-info",
        "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache",
    )  # fmt: skip
    shutil.copytree(ROOT, source, ignore=junk)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(source)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = dist.glob("gradkit-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed():
    folder = Path(tempfile.mkdtemp(prefix="gradkit-wheel-"))
    assert ROOT not in folder.parents
    try:
        yield Installed(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_wheel_holds_the_package_and_its_files_and_nothing_else(installed):
    assert installed.wheel.name == f"gradkit-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
        info = f"gradkit-{VERSION}.dist-info/"
        metadata = wheel.read(info + "METADATA").decode()
        entry_points = wheel.read(info + "entry_points.txt").decode()
        license_text = next(wheel.read(n).decode() for n in names if n.startswith(info) and n.endswith("LICENSE"))
    assert not [n for n in names if FORBIDDEN.search(n)], [n for n in names if FORBIDDEN.search(n)]
    assert {n.split("/")[0] for n in names} == {"gradkit", info.rstrip("/")}
    # every module of the package, the CLI's and the benchmark harness's included
    sources = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "gradkit").rglob("*.py")}
    assert {"gradkit/cli.py", "gradkit/__main__.py", "gradkit/bench/run.py", "gradkit/bench/worker.py"} <= sources
    assert sources == {n for n in names if n.endswith(".py")}
    assert "gradkit = gradkit.cli:main" in entry_points
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert f"\nVersion: {VERSION}\n" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    assert "Provides-Extra: viz" in metadata
    assert re.search(r"^Project-URL: Changelog, \S+", metadata, re.MULTILINE)
    assert re.search(r"^Classifier: ", metadata, re.MULTILINE) and re.search(r"^Keywords: \S+", metadata, re.MULTILINE)


def test_every_public_name_imports_from_the_installed_package(installed):
    check = (
        "import gradkit, sys\n"
        "missing = [n for n in gradkit.__all__ if not hasattr(gradkit, n)]\n"
        "assert not missing, missing\n"
        "print(gradkit.__file__, gradkit.__version__, len(gradkit.__all__))\n"
    )
    done = installed.run("python", "-c", check)
    assert done.returncode == 0, done.stderr
    path, version, count = done.stdout.split()
    assert Path(path).is_relative_to(installed.venv) and version == VERSION and int(count) > 20
    assert installed.run("gradkit", "--version").stdout.strip() == f"gradkit {VERSION}"


def test_demo_quick_trains_without_extras_and_says_how_to_get_the_report(installed):
    done = installed.run("gradkit", "demo", "--quick")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = installed.work / "runs" / "demo"
    assert (run / "tracking.jsonl").stat().st_size > 0
    assert not (run / "report.html").exists()
    assert "gradkit[viz]" in done.stderr  # the way to the report, in one line


def test_bench_runs_from_the_installed_package(installed):
    done = installed.run("gradkit", "bench", "--quick", "--only", "clipping")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| clip_grad_norm_")]
    assert rows and all("torch foreach" in row for row in rows)
    bad = installed.run("gradkit", "bench", "--only", "foo")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "choose from clipping," in bad.stderr


def test_report_with_the_viz_extra(installed):
    if not (installed.work / "runs" / "demo" / "tracking.jsonl").exists():
        assert installed.run("gradkit", "demo", "--quick").returncode == 0
    installed.pip("install", "--quiet", f"{installed.wheel}[viz]")
    done = installed.run("gradkit", "report", "runs/demo")
    assert done.returncode == 0, done.stderr[-3000:]
    page = installed.work / "runs" / "demo" / "report.html"
    assert done.stdout.strip().endswith("report.html") and page.read_text().count("<img") >= 2
