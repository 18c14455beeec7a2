"""The `gradkit` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gradkit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradkit",
        description="gradkit: gradient accumulation, sparse gradients, averaging, norm scaling and tracking for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"gradkit {gradkit.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    report = commands.add_parser("report", help="build an HTML report of a tracked run (gk.Tracker log_dir)")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the log_dir given to gk.Tracker")
    report.add_argument("--out", type=Path, help="where to write the page (default: RUN_DIR/report.html)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "report":
        return _report(args.run_dir, args.out)
    parser.print_help()
    return 0


def _report(run_dir: Path, out: Path | None) -> int:
    from gradkit.tracking.report import RunError, build_report  # late: matplotlib only for this command

    try:
        path = build_report(run_dir, out)
    except (RunError, ImportError, OSError) as error:
        print(f"gradkit report: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
