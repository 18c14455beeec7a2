"""The training run's settings: defaults, a TOML file, and checks with helpful errors.

A config file holds any of the fields of `TrainConfig`, flat or in tables
(``[model]``, ``[data]``, ...); the table names are only for reading::

    name = "tiny-lm"
    steps = 400
    workers = 2

    [data]
    text = "notes.txt"        # a UTF-8 file; leave out for the built-in corpus

    [compression]
    compressor = "topk"
    density = 0.01
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["TrainConfig", "ConfigError", "load_config", "TABLES"]

COMPRESSORS = ("none", "topk", "randomk", "dgc", "powersgd", "fp16", "bf16", "qsgd", "sign")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine")
VALUE_DTYPES = ("float32", "float16", "bfloat16")
CLIPS = ("none", "global", "local", "value", "layer", "agc", "autoclip", "zclip")
MODELS = ("transformer", "gru")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A bad setting: the message names the key, the value and the fix."""


@dataclass
class TrainConfig:
    """Everything a run needs; every field has a default that trains the demo."""

    name: str = "demo"
    run_dir: str = "runs"
    seed: int = 0
    steps: int = 300
    workers: int = 2
    device: str = "auto"  # auto: CUDA when there is a GPU per local worker, else the CPU
    # model
    model: str = "transformer"
    width: int = 96
    layers: int = 2
    context: int = 64
    # data
    text: str = ""  # a UTF-8 file; empty: the Python documentation that ships with CPython
    micro_batch: int = 16
    accumulation_steps: int = 2
    # optimizer
    optimizer: str = "adamw"
    lr: float = 3e-3
    momentum: float = 0.9  # sgd only; with dgc the compressor keeps it (momentum correction)
    schedule: str = "constant"
    # compression
    compressor: str = "topk"
    density: float = 0.01
    rank: int = 2
    dgc_warmup: float = 0.05  # fraction of the steps over which dgc's density falls to `density`
    sparse_values: str = "float32"  # dtype of the values topk and dgc send
    # norm scaling
    clip: str = "global"
    max_norm: float = 1.0
    # tracking and checkpoints
    track_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100
    threads: int = 1

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) / self.name

    def validate(self) -> TrainConfig:
        """Check every field; raise ConfigError naming the first bad one."""
        for key in ("steps", "workers", "width", "layers", "context", "micro_batch", "accumulation_steps", "rank",
                    "track_every", "eval_every", "eval_batches", "checkpoint_every", "threads"):  # fmt: skip
            _int_at_least(key, getattr(self, key), 1)
        _int_at_least("seed", self.seed, 0)
        for key in ("lr", "max_norm"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
                raise ConfigError(f"{key} must be a positive number, got {value!r}")
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or not 0 < self.density <= 1:
            raise ConfigError(
                f"density must be in (0, 1], got {self.density!r}; e.g. density = 0.01 keeps 1% of the entries"
            )
        for key, hint in (
            ("momentum", "e.g. momentum = 0.9, or 0 for none"),
            ("dgc_warmup", "e.g. dgc_warmup = 0.05, or 0 for none"),
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"{key} must be in [0, 1), got {value!r}; {hint}")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("sparse_values", self.sparse_values, VALUE_DTYPES)
        _choice("compressor", self.compressor, COMPRESSORS)
        _choice("clip", self.clip, CLIPS)
        _choice("model", self.model, MODELS)
        _choice("device", self.device, DEVICES)
        for key in ("name", "run_dir", "text"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{key} must be a string, got {getattr(self, key)!r}")
        if self.clip == "local" and self.compressor != "dgc":
            raise ConfigError(
                f"clip = 'local' clips before compression, which only dgc does (gk.DGC(clip_norm=...)); "
                f"got compressor = {self.compressor!r}: use clip = 'global', or compressor = 'dgc'"
            )
        if not self.name or "/" in self.name:
            raise ConfigError(f"name must be a plain folder name, got {self.name!r}")
        if self.width % 4:
            raise ConfigError(f"width must be a multiple of 4 (attention heads), got {self.width}")
        return self


#: tables a config file may group its keys in
TABLES = ("run", "model", "data", "optimizer", "compression", "clipping", "tracking")


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a TOML file into a checked `TrainConfig`; `overrides` (non-None) win.

    A file without ``name`` runs under the file's own name (``tiny.toml`` writes
    ``runs/tiny``), so two configs never share, and resume, one run folder.

    Raises:
        ConfigError: a missing or unreadable file, bad TOML, an unknown key (the
            message suggests the closest valid one), or a bad value.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {str(path)!r}: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in TABLES and isinstance(value, dict):
            values.update(value)
        else:
            values[key] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    values.setdefault("name", path.stem)
    return config_from(values)


def config_from(values: dict[str, Any]) -> TrainConfig:
    """A checked config from a flat dict of settings."""
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, list(known) + list(TABLES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
    for key, value in values.items():
        default = known[key].default
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif not isinstance(value, type(default)) or (isinstance(value, bool) and not isinstance(default, bool)):
            got = _KINDS.get(type(value), type(value).__name__)
            raise ConfigError(f"{key} must be {_KINDS[type(default)]}, got {got} {value!r}")
    return TrainConfig(**values).validate()


#: how an error names the type a setting needs ("steps must be an integer")
_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list", dict: "a table"}


def _int_at_least(key: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _choice(key: str, value: object, options: tuple[str, ...]) -> None:
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key} must be one of {', '.join(options)}; got {value!r}{hint}")
