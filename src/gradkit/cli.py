"""The `gradkit` command line: demo, train, report, bench.

User errors (a bad config, a missing file, an unwritable directory, a checkpoint
these settings cannot resume) print one clear line and exit with status 2,
without a traceback and before any worker starts; a failing worker is one line
too (exit 1), with the full traceback in ``RUN_DIR/error.log`` (``--verbose``
prints it). Ctrl-C stops training after the current step, keeps the last
checkpoint and exits with 130. Running a finished run again trains nothing: it
shows the run's summary (``--steps`` above the finished count trains on,
``--fresh`` starts over). Byte counts are in SI units (1 MB = 10**6 bytes).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import gradkit
from gradkit._units import against_dense, si_bytes

DEMO_STEPS, QUICK_STEPS = 300, 30


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradkit",
        description=(
            "gradkit: gradient accumulation, sparse gradients, averaging, norm scaling and tracking for PyTorch."
        ),
    )
    parser.add_argument("--version", action="version", version=f"gradkit {gradkit.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="train a small character-level model on 2 local workers, with every part of gradkit on"
    )
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
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        help="where to train: cuda (one GPU per worker, NCCL), cpu (gloo), or auto (default: "
        "cuda when there is a GPU per local worker, else cpu)",
    )
    parser.add_argument("--name", help="run name: the folder under the run directory")
    parser.add_argument("--run-dir", dest="run_dir", help="where runs are written (default: runs)")
    parser.add_argument(
        "--fresh", action="store_true", help="start over: remove the run folder's checkpoint, logs and report first"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="on a worker failure, print the full traceback (always kept in RUN_DIR/error.log)",
    )


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
    from gradkit.train import runs
    from gradkit.train.config import ConfigError, config_from, load_config
    from gradkit.train.launch import WorkerError, check_setup, run_training

    overrides = {
        "steps": args.steps,
        "workers": args.workers,
        "name": args.name,
        "run_dir": args.run_dir,
        "device": args.device,
    }
    speaks = os.environ.get("RANK", "0") == "0"  # under torchrun, only the first worker talks
    try:
        if args.command == "demo":
            defaults = (
                {"steps": QUICK_STEPS, "eval_every": 10, "checkpoint_every": 10, "track_every": 5} if args.quick else {}
            )
            config = config_from({**defaults, **{k: v for k, v in overrides.items() if v is not None}})
        else:
            config = load_config(args.config, **overrides)
        requested = config.device
        # Every user error is reported before the banner, before --fresh removes anything and before
        # any worker starts; auto becomes cpu or cuda.
        config = check_setup(config, fresh=args.fresh)
        if args.fresh and speaks:
            runs.start_over(config.run_path)
        done = runs.checkpoint_step(config.run_path)
        if done is not None and done >= config.steps:
            if speaks:
                print(_complete(args.command, config, done))
            return 0
        if speaks:
            print(_banner(config, done, requested), flush=True)
        summary = run_training(config, checked=True, verbose=args.verbose)
    except ConfigError as error:
        print(f"gradkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except WorkerError as error:
        if args.verbose:
            if error.log.exists():
                print(error.log.read_text(encoding="utf-8", errors="replace"), file=sys.stderr)
        print(f"gradkit {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\ngradkit {args.command}: interrupted; the last checkpoint is kept, run the same command to resume",
            file=sys.stderr,
        )
        return 130
    if speaks:
        summary = _carry_over(runs.load_summary(config.run_path), summary)
        runs.save_summary(config.run_path, summary)
        report = _build_report(Path(summary["run_dir"]))
        print(_summary(summary, report))
    return 130 if summary["interrupted"] else 0


def _banner(config, resumed: int | None, requested: str) -> str:
    from gradkit.train.device import describe_device, local_workers

    start = f"resuming at step {resumed} of" if resumed else "starting"
    device = describe_device(requested, config.device, local_workers(config.workers))
    return (
        f"gradkit {gradkit.__version__}: {start} '{config.name}' with {config.workers} worker(s) on {device}: "
        f"{config.model} on {config.text or 'the Python documentation'}, "
        f"{config.steps} steps of {config.accumulation_steps} micro-batches, "
        f"compressor={config.compressor}, clip={config.clip}; writing {config.run_path}"
    )


def _complete(command: str, config, done: int) -> str:
    """What a finished run says when run again: that it is complete, its summary, and how to train more."""
    from gradkit.train import runs

    more = f"--steps {done + 100}" if command == "demo" else f"--steps {done + 100} (or a larger steps in the config)"
    head = (
        f"gradkit {command}: run '{config.name}' is complete: its checkpoint is at step {done}"
        + (f" (asked for {config.steps})" if config.steps != done else "")
        + f"; nothing to train. Pass {more} to train on, or --fresh to start over."
    )
    saved = runs.load_summary(config.run_path)
    report = config.run_path / "report.html"
    report = report if report.exists() else None
    if saved is None:
        return head + (f"\n  report: {report}" if report else "") + f"\n  run directory: {config.run_path}"
    return head + "\n" + _summary(saved, report, heading="last session")


def _carry_over(previous: dict | None, summary: dict) -> dict:
    """A resumed session keeps the run's first validation loss, so the summary still says where it started."""
    if previous and summary.get("first_val_loss") is None:
        summary = {**summary, "first_val_loss": previous.get("first_val_loss")}
    return summary


def _build_report(run_dir: Path) -> Path | None:
    try:
        from gradkit.tracking.report import build_report

        return build_report(run_dir)
    except ImportError as error:
        print(f"(no report.html: {error})", file=sys.stderr)
        return None


def _summary(summary: dict, report: Path | None, heading: str = "done") -> str:
    from gradkit.train.engine import describe_noise

    ratio = summary["dense_bytes"] / summary["bytes_sent"] if summary["bytes_sent"] else None
    first, train, start = summary["first_val_loss"], summary["train_loss"], summary.get("start", 0)
    trained = summary["steps"] - start
    device = summary.get("device", "cpu")  # the CPU summary reads as it always did
    where = f" (from step {start} to {summary['steps']})" if start else ""
    loss = f"train {train:.3f}, " if train is not None else ""
    lines = [
        "",
        f"{heading}: {trained} steps{where} on {summary['workers']} worker(s)"
        + (f" on {device}" if device != "cpu" else "")
        + f" in {summary['seconds']:.0f} s"
        + (" (interrupted)" if summary["interrupted"] else ""),
        f"  loss: {loss}validation {summary['val_loss']:.3f}"
        + (f" (from {first:.3f} at step 0)" if first is not None else ""),
        f"  sent: {si_bytes(summary['bytes_sent'])} per worker"
        + (f", {against_dense(ratio)}" if ratio else " (nothing sent)")
        + (" in these steps" if start else ""),
        f"  alerts: {len(summary['alerts'])}"
        + "".join(f"\n    step {a['step']}: {a['kind']} in {a['name']}: {a['message']}" for a in summary["alerts"][:5]),
        f"  noise scale: {describe_noise(summary['noise'])}",
        f"  run directory: {summary['run_dir']} (tracking.jsonl, TensorBoard events, checkpoint/)",
    ]
    if report is not None:
        lines.append(f"  report: {report}")
    return "\n".join(lines)


def _report(run_dir: Path, out: Path | None) -> int:
    from gradkit.tracking.report import RunError, build_report  # late: matplotlib only for this command

    # Warnings (a log line skipped, a glyph the plots' font lacks) are one line each, as errors are, not
    # Python's two-line form that quotes gradkit's source.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            path = build_report(run_dir, out)
        except (RunError, ImportError, OSError) as error:
            path = error
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"gradkit report: warning: {message}", file=sys.stderr)
    if isinstance(path, Exception):
        print(f"gradkit report: error: {path}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from gradkit.bench.run import run

    return run(args, prog="gradkit bench")


if __name__ == "__main__":
    sys.exit(main())
