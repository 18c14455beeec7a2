"""The `gradkit` command line."""

from __future__ import annotations

import argparse
import sys

import gradkit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradkit",
        description="gradkit: gradient accumulation, sparse gradients, averaging, norm scaling and tracking for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"gradkit {gradkit.__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
