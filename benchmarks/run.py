"""Run every benchmark and print one markdown table of ratios against the anchors.

    python benchmarks/run.py [--quick] [--out FILE] [--threads N] [--only NAMES] [--quality-steps N]
    python benchmarks/run.py --only gpu     # every [cuda] row, and nothing else

All candidates of a row are measured side by side in the same run, so the
ratios hold on whatever machine this runs on; absolute times do not travel.
To add a benchmark, write a module with ``run(settings) -> list[Row]`` and
list it in BENCHMARKS.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

import bench_averaging
import bench_clipping
import bench_compressors
import bench_memory
import bench_network
import bench_quality
import bench_topk
import bench_tracking
from common import Row, Settings
from timing import Timing

BENCHMARKS = [
    bench_clipping, bench_tracking, bench_topk, bench_compressors, bench_averaging, bench_network, bench_quality,
    bench_memory,
]  # fmt: skip
# `--only gpu`: the [cuda] rows of every module that has them (its `run_cuda(settings)`).
GPU_GROUP = "gpu"

FULL = Settings(warmup=5, repeats=101)
QUICK = Settings(warmup=1, repeats=7)

COLUMNS = (
    "benchmark", "device", "gradkit ms", "reference", "reference ms", "reference / gradkit", "goal",
    "copy ms", "gradkit % of copy BW", "reference % of copy BW",
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats; finishes in seconds")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for the test suite; the numbers mean nothing")
    names = [module.__name__.removeprefix("bench_") for module in BENCHMARKS]
    only_help = f"comma-separated benchmarks to run (default: all): {', '.join(names)}; {GPU_GROUP}: all CUDA rows"
    parser.add_argument("--only", help=only_help)
    parser.add_argument("--quality-steps", type=int, help=f"training steps of each quality run (default: {bench_quality.FULL_STEPS}: about an hour on 2 cores)")
    args = parser.parse_args(argv)
    wanted = names
    if args.only is not None:
        wanted = [name.strip() for name in args.only.split(",")]
        unknown = [name for name in wanted if name not in [*names, GPU_GROUP]]
        if unknown or not wanted:
            bad, choices = ", ".join(map(repr, unknown)) or repr(args.only), ", ".join([*names, GPU_GROUP])
            parser.error(f"--only: unknown benchmark {bad}; choose from {choices}")
    # A named module runs all its rows (CPU and CUDA); `gpu` adds every module's CUDA rows.
    plain = [module for module, name in zip(BENCHMARKS, names) if name in wanted]
    on_gpu = [m for m in BENCHMARKS if hasattr(m, "run_cuda") and (m in plain or GPU_GROUP in wanted)]
    if not plain and not torch.cuda.is_available():
        print(f"--only {GPU_GROUP}: no CUDA GPU here (torch.cuda.is_available() is False); no CUDA row was run")
        return 0
    if args.quality_steps is not None and args.quality_steps < 1:
        parser.error(f"--quality-steps must be >= 1, got {args.quality_steps}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    base = QUICK if args.quick else FULL
    settings = Settings(warmup=base.warmup, repeats=base.repeats, tiny=args.tiny, quality_steps=args.quality_steps)

    rows = []
    for module in [module for module in BENCHMARKS if module in plain or module in on_gpu]:
        # Progress on stderr: the full run takes over an hour; the report goes to stdout.
        started = time.monotonic()
        print(f"running {module.__name__} ...", file=sys.stderr, flush=True)
        if module in plain:
            rows += module.run(settings)
        if module in on_gpu:
            rows += module.run_cuda(settings)
        print(f"{module.__name__} done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    report = "\n".join([machine(), "", f"command: {command(argv)}", "", table(rows), "", notes(rows)])
    print(report)
    if args.out is not None:
        args.out.write_text(report + "\n")
    return 0


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


def command(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python benchmarks/run.py", *args])


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
