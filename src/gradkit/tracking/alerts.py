"""Alert rules: vanishing, exploding, dead and non-finite gradients, per module.

Rules run on logging steps only, on the host values the tracker already read,
so they add no device work. Each condition alerts once when it starts, and
again only after it has cleared, so a persistent problem does not flood the
log.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from gradkit import _checks

__all__ = ["Alert", "AlertRules", "logger"]

#: alerts go to this logger at WARNING level
logger = logging.getLogger("gradkit.tracking")

GLOBAL = "(global)"


@dataclass(frozen=True)
class Alert:
    """One alert: what, where and when.

    Attributes:
        step: the optimizer step (1-based) it was found at.
        kind: "vanishing", "exploding", "dead" or "nonfinite".
        name: the module (a parameter name minus its last component), or
            "(global)" for the whole gradient, "(loss)" when a non-finite
            gradient came from the loss itself.
        message: a sentence saying what was seen and what to check.
        value: the number that triggered it (a norm or a count), if any.
    """

    step: int
    kind: str
    name: str
    message: str
    value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The alert messages; formatted (str.format) only when an alert fires.
_DEAD = (
    "gradient of {0!r} is exactly zero for {1} logged steps: the layer does not learn (dead units, a detached path "
    "or a zero-initialised gate?)"
)
_VANISHING = (
    "gradient norm of {0!r} is {1:.3g} (median layer {2:.3g}) for {3} logged steps: the layer barely learns "
    "(saturating activations, depth without residuals or normalisation?)"
)
_EXPLODING = (
    "gradient norm of {0!r} jumped to {1:.3g}, {2:.3g}x its running average: lower the learning rate or clip "
    "(gk.ClipByGlobalNorm / gk.ZClip)"
)


class _Columns:
    """Per-module rule state as one numpy array per field, aligned with a list of module names, and which
    of those modules each rule has an alert active for (the rules' `_active` set, as arrays)."""

    __slots__ = ("names", "index", "ema", "seen", "vanish", "dead", "known", "active")

    def __init__(self, names: list[str], state: dict[str, dict[str, float]], active: set[tuple[str, str]]) -> None:
        self.names = names
        self.index = {name: i for i, name in enumerate(names)}
        empty = {"ema": 0.0, "seen": 0, "vanish": 0, "dead": 0}
        rows = [state.get(name, empty) for name in names]
        self.ema = np.array([r["ema"] for r in rows], dtype=np.float64)
        self.seen, self.vanish, self.dead = (np.array([r[k] for r in rows], dtype=np.int64) for k in _COUNTERS)
        self.known = np.array([name in state for name in names], dtype=bool)
        # One row per rule of `_RULES`, in that order.
        self.active = np.array([[(kind, name) in active for name in names] for kind in _RULES], dtype=bool).reshape(
            len(_RULES), len(names)
        )


_COUNTERS = ("seen", "vanish", "dead")
_RULES = ("dead", "vanishing", "exploding")


class AlertRules:
    """Thresholds and per-module state of the alert rules (plain numbers).

    Args:
        vanish_abs: a module whose gradient norm is below this is vanishing.
        vanish_ratio: ... or whose norm is below this fraction of the median
            module norm of the step.
        patience: consecutive logged steps a vanishing or dead condition must
            hold before it alerts (one bad batch is not a trend).
        explode_factor: a module (or the global norm) is exploding when its norm
            exceeds this multiple of its running average.
        explode_beta: EMA decay of that running average, per logged step.
        warmup: logged steps of history a module needs before it can explode.

    Example:
        >>> tracker = gk.Tracker("runs/a", alerts=AlertRules(vanish_ratio=1e-4, patience=5))
    """

    def __init__(
        self,
        *,
        vanish_abs: float = 1e-10,
        vanish_ratio: float = 1e-3,
        patience: int = 3,
        explode_factor: float = 10.0,
        explode_beta: float = 0.9,
        warmup: int = 5,
    ) -> None:
        self.vanish_abs = _checks.positive_number("vanish_abs", vanish_abs, "pass an absolute norm floor, e.g. 1e-10")
        self.vanish_ratio = _checks.number_in_range(
            "vanish_ratio", vanish_ratio, 0.0, 1.0, "pass a fraction of the median module norm, e.g. 1e-3"
        )
        self.patience = _checks.positive_int("patience", patience, "pass how many consecutive logged steps, e.g. 3")
        self.explode_factor = _checks.positive_number(
            "explode_factor", explode_factor, "pass a multiple of the running average above 1, e.g. 10"
        )
        if self.explode_factor <= 1:
            raise ValueError(f"explode_factor must be > 1, got {explode_factor!r}; pass e.g. 10")
        self.explode_beta = _checks.number_in_range(
            "explode_beta", explode_beta, 0.0, 1.0, "pass an EMA decay in (0, 1), e.g. 0.9"
        )
        self.warmup = _checks.non_negative_int("warmup", warmup, "pass how many logged steps of history, e.g. 5")
        # name -> {"ema": float, "seen": int, "vanish": int, "dead": int}
        self._state: dict[str, dict[str, float]] = {}
        self._active: set[tuple[str, str]] = set()
        # The modules' state as columns while the same module list is checked step after step (`_sync`
        # writes it back to `_state`); the global norm's state stays in `_state`.
        self._columns: _Columns | None = None
        self._dirty = False

    def forget(self) -> None:
        """Drop every module's history and active alert (the tracker follows another model: its norms are
        not the previous model's, whatever the names)."""
        self._state.clear()
        self._active.clear()
        self._columns = None
        self._dirty = False

    @staticmethod
    def or_default(rules: AlertRules | None) -> AlertRules:
        """`rules`, or the default rules for None; a TypeError for anything else."""
        if rules is not None and not isinstance(rules, AlertRules):
            raise TypeError(f"alerts must be gradkit.tracking.AlertRules(...) or None, got {type(rules).__name__}")
        return rules if rules is not None else AlertRules()

    def check(self, step: int, norms: dict[str, float | None], global_norm: float) -> list[Alert]:
        """Alerts for one logged step from the module norms (pre-clip; None if non-finite) and the global norm."""
        return self.check_columns(step, list(norms), list(norms.values()), global_norm)

    def check_columns(
        self, step: int, names: Sequence[str], norms: Sequence[float | None] | np.ndarray, global_norm: float
    ) -> list[Alert]:
        """`check` with the module names and norms as two lists (or the norms as an array, NaN for non-finite):
        each rule runs over whole columns, as numpy operations.

        A module whose norm is None or non-finite is left alone (that is the nonfinite rule's).
        """
        state = self._columns_for(names)
        with np.errstate(all="ignore"):  # overflow is inf, as in Python floats; NaN is not finite
            return self._check_columns(step, names, state, np.asarray(norms, dtype=np.float64), global_norm)

    def _check_columns(
        self, step: int, names: Sequence[str], state: _Columns, values: np.ndarray, global_norm: float
    ) -> list[Alert]:
        # A handful of modules is the common case, where each numpy call costs about a microsecond whatever its
        # length: the healthy step (every norm finite, no alert starting or active) makes about 30 of them.
        ok = np.isfinite(values)
        every = bool(ok.all())
        if not every:
            values = np.where(ok, values, 0.0)  # a module left alone reads as 0: not low, not exploding, not dead
        median = _median(np.sort(values[values > 0]))
        zero = values == 0.0
        # below the absolute floor or below the fraction of the median: below the larger of the two
        low = (values != 0.0) & (values < max(self.vanish_abs, self.vanish_ratio * median))
        bound = self.explode_factor * state.ema
        exploding = (state.seen >= self.warmup) & (values > bound) & (bound > 0)
        if every:
            state.dead = np.where(zero, state.dead + 1, 0)
            state.vanish = np.where(low, state.vanish + 1, 0)
            on = (state.dead >= self.patience, state.vanish >= self.patience, exploding)
        else:
            zero &= ok
            state.dead = np.where(ok, np.where(zero, state.dead + 1, 0), state.dead)
            state.vanish = np.where(ok, np.where(low, state.vanish + 1, 0), state.vanish)
            on = (ok & (state.dead >= self.patience), ok & (state.vanish >= self.patience), exploding)
        starts = on[0].any() or on[1].any() or on[2].any() or state.active.any()
        fired = self._fired(step, names, state, values, median, on, ok) if starts else []
        beta, ema = self.explode_beta, state.ema
        state.ema = np.where(state.seen == 0, values, beta * ema + (1 - beta) * values)
        if every:
            state.seen = state.seen + 1
            state.known.fill(True)
        else:
            state.ema = np.where(ok, state.ema, ema)
            state.seen = state.seen + ok
            state.known |= ok
        self._dirty = True
        return fired + self._check_global(step, global_norm)

    def _fired(
        self, step: int, names: Sequence[str], state: _Columns, values: np.ndarray, median: float,
        on: tuple[np.ndarray, ...], ok: np.ndarray,
    ) -> list[Alert]:  # fmt: skip
        """The alerts that start at this step (rows of `on`: dead, vanishing, exploding), module by module."""
        dead, vanish, ema = state.dead, state.vanish, state.ema
        fired: list[tuple[int, int, Alert]] = []
        for order, (kind, message) in enumerate((
            ("dead", lambda i: (_DEAD, names[i], int(dead[i]))),
            ("vanishing", lambda i: (_VANISHING, names[i], float(values[i]), median, int(vanish[i]))),
            ("exploding",
             lambda i: (_EXPLODING, names[i], float(values[i]), float(values[i] / ema[i]) if ema[i] else math.inf)),
        )):  # fmt: skip
            for i in self._edges(order, kind, names, on[order], ok):
                text, *args = message(i)
                fired.append((i, order, Alert(step, kind, names[i], f"step {step}: " + text.format(*args),
                                              float(values[i]))))  # fmt: skip
        fired.sort(key=lambda item: item[:2])  # module by module, as the rules read: dead, vanishing, exploding
        return [alert for _, _, alert in fired]

    def _edges(self, row: int, kind: str, names: Sequence[str], on: np.ndarray, ok: np.ndarray) -> list[int]:
        """Where one rule's alert starts, over all modules: on now and not active; an alert stays active (and
        quiet) while its condition holds, and is cleared where a module read this step (ok) has it off."""
        active = self._columns.active[row]
        cleared = active & ok & ~on
        started = on & ~active
        for i in np.flatnonzero(cleared).tolist():
            self._active.discard((kind, names[i]))
        new = np.flatnonzero(started).tolist()
        self._active.update((kind, names[i]) for i in new)
        self._columns.active[row] = (active & ~cleared) | on
        return new

    def _check_global(self, step: int, norm: float) -> list[Alert]:
        """The exploding rule on the global norm (the only rule it has)."""
        if norm is None or not math.isfinite(norm):
            return []
        state = self._state.setdefault(GLOBAL, {"ema": 0.0, "seen": 0, "vanish": 0, "dead": 0})
        exploding = state["seen"] >= self.warmup and norm > self.explode_factor * state["ema"] > 0
        alerts = self._edge(step, "exploding", GLOBAL, exploding, norm,
                            _EXPLODING, GLOBAL, norm, norm / state["ema"] if state["ema"] else math.inf)  # fmt: skip
        state["ema"] = norm if state["seen"] == 0 else self.explode_beta * state["ema"] + (1 - self.explode_beta) * norm
        state["seen"] += 1
        return alerts

    def _columns_for(self, names: Sequence[str]) -> _Columns:
        """The modules' state as columns aligned with `names` (rebuilt only when the names change)."""
        columns = self._columns
        if columns is not None and (columns.names is names or columns.names == names):
            return columns
        self._sync()
        columns = _Columns(list(names), self._state, self._active)
        self._columns = columns
        return columns

    def _sync(self) -> None:
        """Write the columns' state back into the per-name dicts."""
        columns = self._columns
        if columns is not None and self._dirty:
            ema, (seen, vanish, dead) = columns.ema.tolist(), (getattr(columns, k).tolist() for k in _COUNTERS)
            for i in np.flatnonzero(columns.known).tolist():
                self._state[columns.names[i]] = {"ema": ema[i], "seen": seen[i], "vanish": vanish[i], "dead": dead[i]}
        self._dirty = False

    def _edge(self, step: int, kind: str, name: str, on: bool, value: float, message: str, *args: Any) -> list[Alert]:
        # The message is formatted only for an alert that fires.
        key = (kind, name)
        if not on:
            self._active.discard(key)
            return []
        if key in self._active:
            return []
        self._active.add(key)
        return [Alert(step, kind, name, f"step {step}: " + message.format(*args), value)]

    def state_dict(self) -> dict[str, Any]:
        self._sync()
        return {
            "modules": {name: dict(state) for name, state in self._state.items()},
            "active": [list(key) for key in sorted(self._active)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _checks.state_keys("AlertRules", state, {"modules", "active"})
        modules = state["modules"]
        if not isinstance(modules, dict) or not all(
            isinstance(v, dict) and set(v) == {"ema", "seen", "vanish", "dead"} for v in modules.values()
        ):
            raise ValueError(
                "AlertRules.load_state_dict: 'modules' must map module names to {ema, seen, vanish, dead}; pass "
                "AlertRules.state_dict()"
            )
        self._state = {name: {k: float(v[k]) if k == "ema" else int(v[k]) for k in v} for name, v in modules.items()}
        self._columns, self._dirty = None, False
        self._active = {(str(kind), str(name)) for kind, name in state["active"]}


def _median(ordered: np.ndarray) -> float:
    """The median of sorted values, as ``statistics.median`` gives it (0.0 for none)."""
    n = len(ordered)
    if not n:
        return 0.0
    if n % 2:
        return float(ordered[n // 2])
    return (float(ordered[n // 2 - 1]) + float(ordered[n // 2])) / 2
