"""The benchmark harness: run the benchmarks and print one markdown table of ratios against the anchors.

    gradkit bench [--quick] [--out FILE] [--threads N] [--tiny] [--only NAMES] [--quality-steps N]
    python benchmarks/run.py ...        (the same harness, from a checkout: measures the checkout's code)

All candidates of a row are measured side by side in the same run, so the
ratios hold on whatever machine this runs on; absolute times do not travel.
To add a benchmark, write a module with ``run(settings) -> list[Row]`` in this
package and list it in BENCHMARKS under its command-line name.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from gradkit.bench import (
    averaging,
    clipping,
    compressors,
    ef_memory,
    ema,
    fsdp,
    hierarchical,
    integrations,
    memory,
    network,
    powersgd,
    quality,
    step,
    topk,
    tracking,
)  # fmt: skip
from gradkit.bench.common import Row, Settings
from gradkit.bench.timing import Timing

__all__ = ["BENCHMARKS", "add_arguments", "main", "run"]

# name for --only -> module, in the order they run
BENCHMARKS = {
    "clipping": clipping,
    "step": step,
    "tracking": tracking,
    "topk": topk,
    "compressors": compressors,
    "averaging": averaging,
    "network": network,
    "hierarchical": hierarchical,
    "quality": quality,
    "memory": memory,
    "ef_memory": ef_memory,
    "ema": ema,
    "powersgd": powersgd,
    "fsdp": fsdp,
    "integrations": integrations,
}

# `--only gpu`: the [cuda] rows of every benchmark that has them (its `run_cuda(settings)`), and nothing else.
GPU = "gpu"

FULL = Settings(warmup=5, repeats=101)
QUICK = Settings(warmup=1, repeats=7)

COLUMNS = (
    "benchmark", "device", "gradkit ms", "reference", "reference ms", "reference / gradkit", "goal",
    "copy ms", "gradkit % of copy BW", "reference % of copy BW",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the harness's options to `parser` (``gradkit bench`` and ``benchmarks/run.py`` share them).

    Args:
        parser: the parser (or subparser) to extend; its ``description`` is set if it has none.

    Example:
        >>> parser = argparse.ArgumentParser(prog="gradkit bench")
        >>> add_arguments(parser)
    """
    names = ", ".join(BENCHMARKS)
    if not parser.description:
        parser.description = f"{__doc__.splitlines()[0]} Benchmarks: {names}."
    quick = "fewer repeats and smaller sizes where a benchmark has them: a check that it runs"
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write the report (markdown) to this file")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for the test suite; the numbers mean nothing")
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help=f"comma-separated benchmarks to run (default: all): {names}; {GPU}: every CUDA row",
    )
    parser.add_argument(
        "--quality-steps", type=int, metavar="N",
        help=f"training steps of each quality run (default: {quality.FULL_STEPS}: about an hour on 2 cores)",
    )  # fmt: skip


def main(argv: list[str] | None = None, prog: str = "python -m gradkit.bench.run") -> int:
    """Parse `argv` (default: the command line) and run the harness; the exit status."""
    parser = argparse.ArgumentParser(prog=prog)
    add_arguments(parser)
    return run(parser.parse_args(argv), prog=prog)


def run(args: argparse.Namespace, prog: str = "gradkit bench") -> int:
    """Run the benchmarks that `args` (from a parser given `add_arguments`) choose; print and return the status.

    A bad option prints one line, ``PROG: error: ...``, and returns 2 before anything runs.
    """
    try:
        chosen, on_gpu = _check(args)
    except ValueError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    if not chosen and not torch.cuda.is_available():
        print(f"--only {GPU}: no CUDA GPU here (torch.cuda.is_available() is False); no CUDA row was run")
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    base = QUICK if args.quick else FULL
    settings = Settings(warmup=base.warmup, repeats=base.repeats, tiny=args.tiny, quality_steps=args.quality_steps)

    rows = []
    for name in [name for name in BENCHMARKS if name in chosen or name in on_gpu]:
        # Progress on stderr: the full run takes over an hour; the report goes to stdout.
        started = time.monotonic()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        if name in chosen:
            rows += BENCHMARKS[name].run(settings)
        if name in on_gpu:
            rows += BENCHMARKS[name].run_cuda(settings)
        print(f"{name} done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    report = "\n".join([machine(), "", f"command: {command(prog, args)}", "", table(rows), "", notes(rows)])
    print(report)
    if args.out is not None:
        args.out.write_text(report + "\n")
    return 0


def _check(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The benchmarks whose rows run, and those whose CUDA rows run (a named benchmark runs both;
    `gpu` adds every CUDA row); ValueError naming the bad option and the fix."""
    wanted = list(BENCHMARKS)
    if args.only is not None:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in BENCHMARKS and name != GPU]
        if unknown or not wanted:
            shown = ", ".join(map(repr, unknown)) if unknown else repr(args.only)
            raise ValueError(f"--only: unknown benchmark {shown}; choose from {', '.join([*BENCHMARKS, GPU])}")
    chosen = [name for name in BENCHMARKS if name in wanted]
    on_gpu = [
        name for name in BENCHMARKS if hasattr(BENCHMARKS[name], "run_cuda") and (name in chosen or GPU in wanted)
    ]
    if args.quality_steps is not None and args.quality_steps < 1:
        raise ValueError(f"--quality-steps must be >= 1, got {args.quality_steps}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    return chosen, on_gpu


def machine() -> str:
    cpu = _cpu_model()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [
        f"CPU: {cpu}, {os.cpu_count()} cores ({usable} usable)",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"Python {platform.python_version()}",
    ]
    if hasattr(os, "getloadavg"):
        # Other work on the machine shows up as spread; the load says how much there was.
        parts.append(f"load average at start {os.getloadavg()[0]:.2f}")
    if torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        parts.append("GPU: none (CUDA not available)")
    return "machine: " + "; ".join(parts)


def command(prog: str, args: argparse.Namespace) -> str:
    """The command line that gives this run, for the report."""
    words = [prog] + [flag for flag in ("--quick", "--tiny") if getattr(args, flag[2:])]
    for flag in ("--threads", "--only", "--quality-steps", "--out"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            words += [flag, str(value)]
    return " ".join(words)


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        if row.skipped:
            continue
        cells = [
            row.benchmark,
            row.device,
            _ms(row.gradkit_time),
            row.reference,
            _ms(row.reference_time),
            f"{row.ratio:.3f}",
            f">= {row.goal:g}",
            _ms(row.copy_time) if row.copy_time else "-",
            _share(row, row.gradkit_time),
            _share(row, row.reference_time),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(rows: list[Row]) -> str:
    lines = [
        "ms: median per call (± half the interquartile range); ratio > 1: gradkit faster.",
        "% of copy BW: bytes streamed per second relative to the copy "
        "(clipping counts 3 passes over the gradients, the copy 2).",
    ]
    lines += [f"- {row.benchmark} [{row.device}]: {row.note}" for row in rows if row.note]
    return "\n".join(lines)


def _ms(timing: Timing) -> str:
    return f"{timing.median * 1e3:.3f} ±{timing.spread:.0%}"


def _share(row: Row, timing: Timing) -> str:
    share = row.copy_bandwidth_share(timing)
    return "-" if share is None else f"{share:.0%}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
