"""The `gradkit` command line: demo, train, report, bench.

User errors (a bad config, a missing file, an unwritable directory) print one
clear line and exit with status 2, without a traceback; Ctrl-C stops training
after the current step, keeps the last checkpoint and exits with 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import gradkit

DEMO_STEPS, QUICK_STEPS = 300, 30


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradkit",
        description="gradkit: gradient accumulation, sparse gradients, averaging, norm scaling and tracking for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"gradkit {gradkit.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser("demo", help="train a small character-level model on 2 local workers, with every part of gradkit on")
    _run_options(demo)
    demo.add_argument("--quick", action="store_true", help=f"a short run ({QUICK_STEPS} steps) to check the setup")

    train = commands.add_parser("train", help="train with a TOML config (resumes from the run directory's checkpoint)")
    train.add_argument("--config", type=Path, required=True, help="a TOML file of settings (see docs/cli.md)")
    _run_options(train)

    report = commands.add_parser("report", help="build an HTML report of a tracked run (gk.Tracker log_dir)")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the log_dir given to gk.Tracker")
    report.add_argument("--out", type=Path, help="where to write the page (default: RUN_DIR/report.html)")

    # The harness's own options: one list for `gradkit bench` and `python benchmarks/run.py`.
    from gradkit.bench.run import add_arguments as bench_arguments

    bench_arguments(commands.add_parser("bench", help="run the benchmark harness and print ratios against the anchors"))
    return parser


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--workers", type=int, help="local worker processes")
    parser.add_argument("--name", help="run name: the folder under the run directory")
    parser.add_argument("--run-dir", dest="run_dir", help="where runs are written (default: runs)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("demo", "train"):
        return _train(args)
    if args.command == "report":
        return _report(args.run_dir, args.out)
    if args.command == "bench":
        return _bench(args)
    parser.print_help()
    return 0


def _train(args: argparse.Namespace) -> int:
    from gradkit.train.config import ConfigError, config_from, load_config
    from gradkit.train.launch import run_training

    overrides = {"steps": args.steps, "workers": args.workers, "name": args.name, "run_dir": args.run_dir}
    try:
        if args.command == "demo":
            defaults = {"steps": QUICK_STEPS, "eval_every": 10, "checkpoint_every": 10, "track_every": 5} if args.quick else {}
            config = config_from({**defaults, **{k: v for k, v in overrides.items() if v is not None}})
        else:
            config = load_config(args.config, **overrides)
        speaks = os.environ.get("RANK", "0") == "0"  # under torchrun, only the first worker talks
        if speaks:
            print(_banner(config), flush=True)
        summary = run_training(config)
    except ConfigError as error:
        print(f"gradkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ngradkit {args.command}: interrupted; the last checkpoint is kept, run the same command to resume", file=sys.stderr)
        return 130
    if speaks:
        report = _build_report(Path(summary["run_dir"]))
        print(_summary(summary, report))
    return 130 if summary["interrupted"] else 0


def _banner(config) -> str:
    from gradkit.train.engine import checkpoint_step

    resumed = checkpoint_step(config.run_path)
    start = f"resuming at step {resumed}" if resumed else "starting"
    return (
        f"gradkit {gradkit.__version__}: {start} '{config.name}' with {config.workers} worker(s): {config.model} on "
        f"{config.text or 'the Python documentation'}, {config.steps} steps of {config.accumulation_steps} micro-batches, "
        f"compressor={config.compressor}, clip={config.clip}; writing {config.run_path}"
    )


def _build_report(run_dir: Path) -> Path | None:
    try:
        from gradkit.tracking.report import build_report

        return build_report(run_dir)
    except ImportError as error:
        print(f"(no report.html: {error})", file=sys.stderr)
        return None


def _summary(summary: dict, report: Path | None) -> str:
    from gradkit.train.engine import describe_noise

    ratio = summary["dense_bytes"] / summary["bytes_sent"] if summary["bytes_sent"] else None
    first = summary["first_val_loss"]
    lines = [
        "",
        f"done: {summary['steps']} steps on {summary['workers']} worker(s) in {summary['seconds']:.0f} s" + (" (interrupted)" if summary["interrupted"] else ""),
        f"  loss: train {summary['train_loss']:.3f}, validation {summary['val_loss']:.3f}" + (f" (from {first:.3f})" if first is not None else ""),
        f"  sent: {summary['bytes_sent'] / 1e6:.2f} MB per worker vs {summary['dense_bytes'] / 1e6:.2f} MB dense"
        + (f" ({ratio:.0f}x less)" if ratio else " (one worker: nothing sent)"),
        f"  alerts: {len(summary['alerts'])}" + "".join(f"\n    step {a['step']}: {a['kind']} in {a['name']}: {a['message']}" for a in summary["alerts"][:5]),
        f"  noise scale: {describe_noise(summary['noise'])}",
        f"  run directory: {summary['run_dir']} (tracking.jsonl, TensorBoard events, checkpoint/)",
    ]
    if report is not None:
        lines.append(f"  report: {report}")
    return "\n".join(lines)


def _report(run_dir: Path, out: Path | None) -> int:
    from gradkit.tracking.report import RunError, build_report  # late: matplotlib only for this command

    try:
        path = build_report(run_dir, out)
    except (RunError, ImportError, OSError) as error:
        print(f"gradkit report: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from gradkit.bench.run import run

    return run(args, prog="gradkit bench")


if __name__ == "__main__":
    sys.exit(main())
