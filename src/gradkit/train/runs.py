"""A run folder's state between commands: finished or not, resumable with these settings, its summary.

A run folder (``runs/NAME``) holds the checkpoint, the tracking log, TensorBoard
events, ``report.html``, ``summary.json`` (the last session's summary) and, after
a worker failed, ``error.log``. Everything here reads or removes those files in
the launching process, before any worker starts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from gradkit.train.config import ConfigError, TrainConfig

__all__ = [
    "ERROR_LOG",
    "SUMMARY",
    "check_resumable",
    "checkpoint_step",
    "load_summary",
    "save_summary",
    "shape_settings",
    "start_over",
]

ERROR_LOG, SUMMARY = "error.log", "summary.json"
#: settings that decide the shapes in a checkpoint (model, optimizer and pipeline state, one file per worker)
SHAPE_KEYS = ("model", "width", "layers", "context", "text", "optimizer", "compressor", "rank", "clip", "workers")


def checkpoint_step(run_path: Path) -> int | None:
    """The step of the last complete checkpoint in `run_path`, or None."""
    marker = run_path / "checkpoint" / "step.json"
    if not marker.exists():
        return None
    return int(json.loads(marker.read_text())["step"])


def shape_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings a checkpoint can only be resumed with (PowerSGD's rank only matters with powersgd)."""
    settings = {key: getattr(config, key) for key in SHAPE_KEYS}
    if config.compressor != "powersgd":
        del settings["rank"]
    return settings


def check_resumable(config: TrainConfig) -> None:
    """Refuse, in one line naming the setting, to resume a checkpoint written with another shape.

    Raises:
        ConfigError: the run folder's checkpoint was written with a different
            model, optimizer, compressor, clip or worker count.
    """
    marker = config.run_path / "checkpoint" / "step.json"
    if not marker.exists():
        return
    saved = json.loads(marker.read_text())
    settings = dict(saved.get("settings") or {})
    settings.setdefault("workers", saved.get("workers", 1))  # checkpoints from before settings were recorded
    for key, value in shape_settings(config).items():
        if key in settings and settings[key] != value:
            raise ConfigError(
                f"{config.run_path} holds a checkpoint with {key} = {settings[key]!r}, this run has {key} = {value!r}; "
                f"set {key} = {settings[key]!r} to resume it, pass --fresh to start over, or pick another --name"
            )


def start_over(run_path: Path) -> None:
    """Remove what a previous run left in `run_path` (checkpoint, logs, events, report, summary)."""
    shutil.rmtree(run_path / "checkpoint", ignore_errors=True)
    names = ("tracking.jsonl", "report.html", SUMMARY, ERROR_LOG)
    for path in [run_path / name for name in names] + list(run_path.glob("events.out.tfevents.*")):
        path.unlink(missing_ok=True)


def save_summary(run_path: Path, summary: dict[str, Any]) -> None:
    """Keep the session's summary, so that a finished run can show it again without training."""
    partial = run_path / (SUMMARY + ".partial")
    partial.write_text(json.dumps(summary, indent=1))
    os.replace(partial, run_path / SUMMARY)


def load_summary(run_path: Path) -> dict[str, Any] | None:
    """The last saved summary of the run in `run_path`, or None."""
    try:
        return json.loads((run_path / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
