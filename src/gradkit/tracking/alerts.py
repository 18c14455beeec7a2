"""Alert rules: vanishing, exploding, dead and non-finite gradients, per module.

Rules run on logging steps only, on the host values the tracker already read,
so they add no device work. Each condition alerts once when it starts, and
again only after it has cleared, so a persistent problem does not flood the
log.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

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

    @staticmethod
    def or_default(rules: AlertRules | None) -> AlertRules:
        """`rules`, or the default rules for None; a TypeError for anything else."""
        if rules is not None and not isinstance(rules, AlertRules):
            raise TypeError(f"alerts must be gradkit.tracking.AlertRules(...) or None, got {type(rules).__name__}")
        return rules if rules is not None else AlertRules()

    def check(self, step: int, norms: dict[str, float | None], global_norm: float) -> list[Alert]:
        """Alerts for one logged step from the module norms (pre-clip; None if non-finite) and the global norm."""
        finite = [n for n in norms.values() if n is not None and math.isfinite(n) and n > 0]
        median = statistics.median(finite) if finite else 0.0
        alerts = []
        for name, norm in list(norms.items()) + [(GLOBAL, global_norm)]:
            if norm is None or not math.isfinite(norm):
                continue  # non-finite values (None in a record) are the nonfinite rule's
            state = self._state.setdefault(name, {"ema": 0.0, "seen": 0, "vanish": 0, "dead": 0})
            if name != GLOBAL:
                dead = norm == 0.0
                vanishing = not dead and (norm < self.vanish_abs or norm < self.vanish_ratio * median)
                state["dead"] = state["dead"] + 1 if dead else 0
                state["vanish"] = state["vanish"] + 1 if vanishing else 0
                alerts += self._edge(step, "dead", name, state["dead"] >= self.patience, norm,
                                     _DEAD, name, int(state["dead"]))  # fmt: skip
                alerts += self._edge(step, "vanishing", name, state["vanish"] >= self.patience, norm,
                                     _VANISHING, name, norm, median, int(state["vanish"]))  # fmt: skip
            exploding = state["seen"] >= self.warmup and norm > self.explode_factor * state["ema"] > 0
            alerts += self._edge(step, "exploding", name, exploding, norm,
                                 _EXPLODING, name, norm, norm / state["ema"] if state["ema"] else math.inf)  # fmt: skip
            state["ema"] = (
                norm if state["seen"] == 0 else self.explode_beta * state["ema"] + (1 - self.explode_beta) * norm
            )
            state["seen"] += 1
        return alerts

    def _edge(self, step: int, kind: str, name: str, on: bool, value: float, message: str, *args: Any) -> list[Alert]:
        # The message is formatted only for an alert that fires: the rules run over every module each logged step.
        key = (kind, name)
        if not on:
            self._active.discard(key)
            return []
        if key in self._active:
            return []
        self._active.add(key)
        return [Alert(step, kind, name, f"step {step}: " + message.format(*args), value)]

    def state_dict(self) -> dict[str, Any]:
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
        self._active = {(str(kind), str(name)) for kind, name in state["active"]}
