"""Where logged steps go: a JSONL file, TensorBoard, and the JSONL reader.

JSONL is the durable format (one JSON object per line, flushed after each
line, so a crash loses at most the line being written); the report is built
from it. The schema is `STEP_FIELDS` / `RUN_FIELDS` below and in
docs/tracking.md.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradkit._files import make_writable_dir

__all__ = [
    "JSONL_NAME",
    "SCHEMA",
    "RUN_FIELDS",
    "STEP_FIELDS",
    "STAT_FIELDS",
    "JsonlWriter",
    "TensorBoardWriter",
    "make_writers",
    "read_jsonl",
    "clean",
]

JSONL_NAME = "tracking.jsonl"
SCHEMA = "gradkit.tracking/1"
WRITERS = ("jsonl", "tensorboard")

#: keys of the first record of a run ("type": "run") and their JSON types
RUN_FIELDS = {
    "type": str,
    "schema": str,
    "version": str,
    "time": float,
    "every": int,
    "params": list,
    "modules": list,
    "meta": dict,
}
#: keys of a step record ("type": "step"); None marks fields that may be null
STEP_FIELDS = {
    "type": str, "schema": str, "step": int, "time": float, "steps_since_log": int, "detail": bool,
    "global": dict, "modules": dict, "params": dict, "noise": (dict, None), "alerts": list, "ranks": (list, None),
}  # fmt: skip
GLOBAL_FIELDS = {
    "norm_pre_clip": (float, None), "norm": (float, None), "clip_coef": (float, None), "clipped_steps": int,
    "clip_rate": float, "skipped": bool, "skipped_steps": int, "items": (float, None), "bytes_sent": int,
    "bytes_since_log": int, "dense_bytes": (int, None), "compression_ratio": (float, None),
}  # fmt: skip
#: keys of each entry of "modules" and "params"
STAT_FIELDS = {
    "norm_pre_clip": (float, None), "norm": (float, None), "max_abs": (float, None), "rms": (float, None),
    "zero_frac": (float, None), "nan": (int, None), "inf": (int, None), "numel": int, "weight_norm": (float, None),
    "grad_to_weight": (float, None), "update_to_weight": (float, None),
}  # fmt: skip
NOISE_FIELDS = {
    "small_sq": (float, None), "small_batch": float, "big_sq": (float, None), "big_batch": float,
    "g2": (float, None), "trace": (float, None), "b_simple": (float, None), "advice": (str, None),
}  # fmt: skip
ALERT_FIELDS = {"step": int, "kind": str, "name": str, "message": str, "value": (float, None)}


def clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (strict JSON has no NaN/Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        if value and all(type(v) in _FLAT for v in value.values()):  # a statistics entry: no call per value
            return {k: None if type(v) is float and not math.isfinite(v) else v for k, v in value.items()}
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


_FLAT = (float, int, bool, str, type(None))


class JsonlWriter:
    """Append one JSON object per line to ``log_dir/tracking.jsonl``, flushed per line.

    Raises:
        ValueError: `log_dir` cannot be created or written (named in the message).
    """

    def __init__(self, log_dir: Path) -> None:
        self.path = Path(log_dir) / JSONL_NAME
        self._file = _open_for_append(self.path)

    def write(self, record: dict[str, Any], histograms: dict | None = None) -> None:
        # One write call per line and a flush: a crash leaves whole lines plus at most one partial one,
        # which read_jsonl skips with a warning.
        try:  # records the tracker wrote are clean already: cleaning again costs as much as encoding
            line = json.dumps(record, allow_nan=False)
        except ValueError:
            line = json.dumps(clean(record), allow_nan=False)
        self.write_line(line)

    def write_line(self, line: str) -> None:
        """Append one JSON text already encoded (a step record's `record.StepRecord.line`)."""
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardWriter:
    """Scalars and gradient histograms through ``torch.utils.tensorboard.SummaryWriter``.

    Scalars: ``global/*``, ``noise/*``, ``grad_norm/<module>``,
    ``grad_to_weight/<module>``, ``update_to_weight/<module>``. Histograms:
    ``grad/<module>``, binned on the device and written with ``add_histogram_raw``.

    Raises:
        ImportError: tensorboard is not installed (``pip install 'gradkit[viz]'``).
    """

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # torch raises this when the tensorboard package is missing
            raise ImportError(
                "the 'tensorboard' writer needs the tensorboard package: pip install 'gradkit[viz]' "
                "(or pip install tensorboard), or pass writers=('jsonl',)"
            ) from error
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict[str, Any], histograms: dict | None = None) -> None:
        step = record["step"]
        add = self._writer.add_scalar
        for key in (
            "norm_pre_clip",
            "norm",
            "clip_coef",
            "clip_rate",
            "skipped_steps",
            "bytes_sent",
            "compression_ratio",
        ):
            value = record["global"].get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                add(f"global/{key}", value, step)
        for key in ("b_simple", "g2", "trace"):
            value = (record["noise"] or {}).get(key)
            if isinstance(value, float) and math.isfinite(value):
                add(f"noise/{key}", value, step)
        for name, stats in record["modules"].items():
            for key, tag in (
                ("norm_pre_clip", "grad_norm"),
                ("grad_to_weight", "grad_to_weight"),
                ("update_to_weight", "update_to_weight"),
            ):
                value = stats.get(key)
                if isinstance(value, float) and math.isfinite(value):
                    add(f"{tag}/{name}", value, step)
        for name, hist in (histograms or {}).items():
            self._writer.add_histogram_raw(f"grad/{name}", global_step=step, **hist)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def make_writers(names: Sequence[str], log_dir: Path | None) -> list:
    """The writers named in `names` (already validated), writing under `log_dir`."""
    if log_dir is None:
        return []
    return [JsonlWriter(log_dir) if name == "jsonl" else TensorBoardWriter(log_dir) for name in names]


def check_writers(writers: object) -> tuple[str, ...]:
    """`writers` as a tuple of known names, or a clear error."""
    if isinstance(writers, str):
        writers = (writers,)
    if not isinstance(writers, (list, tuple)):
        raise TypeError(
            f"writers must be a tuple of names from {WRITERS}, got {writers!r}; e.g. writers=('jsonl', 'tensorboard')"
        )
    unknown = [w for w in writers if w not in WRITERS]
    if unknown:
        raise ValueError(
            f"unknown writer {unknown[0]!r} in writers={tuple(writers)!r}; choose from {WRITERS}, e.g. "
            "writers=('jsonl', 'tensorboard')"
        )
    return tuple(dict.fromkeys(writers))


def check_meta(meta: object) -> dict[str, Any]:
    """A copy of `meta` (run settings for the log header), or an error if it is not a dict of JSON values."""
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(
            f"meta must be a dict of run settings or None, got {type(meta).__name__} {meta!r}; "
            "pass e.g. {'max_norm': 1.0}"
        )
    meta = dict(meta or {})
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"meta must hold JSON values (numbers, strings, lists, dicts): {error}; "
            "convert the offending value, e.g. str(x)"
        ) from None
    return meta


def check_log_dir(log_dir: object) -> Path | None:
    """Create `log_dir` and make sure a file can be written there."""
    if log_dir is None:
        return None
    if not isinstance(log_dir, (str, Path)):
        raise TypeError(f"log_dir must be a path or None, got {type(log_dir).__name__} {log_dir!r}")
    path = Path(log_dir)
    try:
        make_writable_dir(path)
    except OSError as error:
        raise ValueError(
            f"log_dir {str(path)!r} is not writable ({error.strerror or error}); pass a directory you can write to, "
            "or log_dir=None to keep the history in memory only"
        ) from None
    return path


def _open_for_append(path: Path):
    try:
        return path.open("a", encoding="utf-8")
    except OSError as error:
        raise ValueError(
            f"cannot open {str(path)!r} for writing ({error.strerror or error}); pass a writable log_dir"
        ) from None


def read_jsonl(path: Path, *, skipped: list[int] | None = None) -> list[dict[str, Any]]:
    """The records of a JSONL log; lines that do not parse (a run killed mid-write) are skipped with a warning.

    Args:
        path: the log.
        skipped: a list that the numbers (1-based) of the skipped lines are appended to, for a caller that
            counts them (the report); the warnings are given all the same.

    Returns:
        The records (JSON objects), in file order.

    Example:
        >>> bad = []
        >>> records = read_jsonl(Path("runs/exp1/tracking.jsonl"), skipped=bad)
        >>> len(bad)        # lines of a run stopped mid-write
        0
    """
    records = []
    skipped = skipped if skipped is not None else []
    with Path(path).open(encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                warnings.warn(
                    f"{path}: line {number} is not valid JSON ({error.msg}), skipped; the run was probably interrupted "
                    "while writing it",
                    stacklevel=2,
                )
                skipped.append(number)
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                warnings.warn(f"{path}: line {number} is not a JSON object, skipped", stacklevel=2)
                skipped.append(number)
    return records


def schema_errors(record: dict[str, Any]) -> list[str]:
    """Where `record` departs from the documented schema (empty when it conforms)."""
    kind = record.get("type")
    if kind == "run":
        return _check(record, RUN_FIELDS, "run")
    errors = _check(record, STEP_FIELDS, "step")
    if errors:
        return errors
    errors += _check(record["global"], GLOBAL_FIELDS, "global")
    for section in ("modules", "params"):
        for name, stats in record[section].items():
            errors += _check(stats, STAT_FIELDS, f"{section}[{name!r}]")
    if record["noise"] is not None:
        errors += _check(record["noise"], NOISE_FIELDS, "noise")
    for i, alert in enumerate(record["alerts"]):
        errors += _check(alert, ALERT_FIELDS, f"alerts[{i}]")
    return errors


def _check(obj: dict[str, Any], fields: dict[str, Any], where: str) -> list[str]:
    errors = []
    if set(obj) != set(fields):
        errors.append(f"{where}: keys {sorted(set(obj) ^ set(fields))} differ from the schema")
    for key, spec in fields.items():
        if key not in obj:
            continue
        allowed = spec if isinstance(spec, tuple) else (spec,)
        value = obj[key]
        ok = any(
            (t is None and value is None)
            or (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (t is int and isinstance(value, int) and not isinstance(value, bool))
            or (t not in (None, float, int) and isinstance(value, t))
            for t in allowed
        )
        if not ok:
            errors.append(f"{where}.{key}: {value!r} is not {allowed}")
    return errors
