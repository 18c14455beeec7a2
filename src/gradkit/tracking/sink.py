"""Where a logged step ends: its alerts decided, its record kept in memory and written, the alerts logged.

A `Tracker` hands each logged step to its `RecordSink` once the step's host copies have
completed (`pending.Pending.completed`). The sink turns the read values into the step's
record, runs the alert rules and the non-finite watch on it, fills in the update ratios,
appends the record to `history` and passes it to every writer. The run header and the
alerts of a replay (`Tracker.locate_nonfinite`) go to the file writers through it too.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradkit._version import __version__
from gradkit.tracking.alerts import Alert, AlertRules, logger
from gradkit.tracking.entries import KEYS, ZEROS, Entries
from gradkit.tracking.nonfinite import NonfiniteWatch
from gradkit.tracking.pending import Logged
from gradkit.tracking.record import StepRecord
from gradkit.tracking.summary import Layout
from gradkit.tracking.writers import SCHEMA, JsonlWriter, make_writers

__all__ = ["RecordSink"]

_NAN, _INF = KEYS.index("nan"), KEYS.index("inf")


class RecordSink:
    """The writers, the in-memory `history` and `alerts`, and the rules that decide a step's alerts.

    Args:
        writer_names: validated writer names (`writers.check_writers`).
        log_dir: where the writers write, or None (history in memory only).
        rules: the alert rules (their state lives on across steps).
        nonfinite: the tracker's non-finite watch (it arms the re-check a non-finite step asks for).
        loud: log alerts at WARNING (False on ranks that only join sharded reductions).
        keep: how many logged steps `history` holds (the most recent), or None for all of them.

    Example:
        >>> sink = RecordSink(("jsonl",), Path("runs/a"), AlertRules(), NonfiniteWatch(), loud=True)
        >>> sink.header({"type": "run", ...})
        >>> sink.write(logged, next_step=8)        # a logged step whose host copies completed
        >>> sink.history[-1]["step"], sink.last_alerts
    """

    def __init__(
        self,
        writer_names: Sequence[str],
        log_dir: Path | None,
        rules: AlertRules,
        nonfinite: NonfiniteWatch,
        *,
        loud: bool,
        keep: int | None = None,
    ) -> None:
        self._writer_names, self._log_dir = tuple(writer_names), log_dir
        self.writers = make_writers(writer_names, log_dir)
        self._closed = False
        self.rules, self.nonfinite, self.loud = rules, nonfinite, loud
        self._history: list[dict[str, Any]] = []
        self._unread: list[StepRecord] = []  # records not yet made dicts: that waits until `history` is read
        self.keep = keep
        self._alerts: list[Alert] = []
        # Each alert's ordinal: how many records were written before it was raised (a record's alerts take the
        # record's own). Alerts are dropped with `keep` by ordinal, not by step: steps start over at a re-attach.
        self._ordinals: list[int] = []
        self._written = 0  # records written so far
        self.last_alerts: list[Alert] = []

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per logged step, oldest first (the same list object every time, growing; with `keep`,
        its most recent `keep` steps)."""
        if self._unread:
            self._history.extend(record.to_dict() for record in self._unread)
            self._unread.clear()
        if self.keep is not None and len(self._history) > self.keep:
            del self._history[: len(self._history) - self.keep]
        return self._history

    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far, oldest first; with `keep`, those of the steps `history` holds and later ones."""
        if self.keep is not None:  # those of the last `keep` records written, the ones `history` holds
            self._drop_alerts(self._written - self.keep)
        return self._alerts

    @alerts.setter
    def alerts(self, alerts: list[Alert]) -> None:
        # Alerts restored (a resume): kept as if raised now, before the next record.
        self._alerts, self._ordinals = alerts, [self._written] * len(alerts)

    def _drop_alerts(self, before: int) -> None:
        """Drop the alerts raised before the record of ordinal `before` was written (they come in that order)."""
        # `alerts` is the caller's list too: one cleared or cut from the front keeps the ordinals of its last ones.
        held, known = len(self._alerts), len(self._ordinals)
        if held != known:
            self._ordinals = (
                self._ordinals[known - held :] if held < known else [before] * (held - known) + self._ordinals
            )
        cut = bisect.bisect_left(self._ordinals, before)
        del self._alerts[:cut], self._ordinals[:cut]

    def _bound(self) -> None:
        """Drop the oldest records once twice `keep` are held (cut in bulk: one slice per `keep` steps, not a
        shift of the whole list per step); `history` cuts to exactly `keep` when read."""
        if self.keep is None or len(self._history) + len(self._unread) <= 2 * self.keep:
            return
        excess = len(self._history) + len(self._unread) - self.keep
        dropped = min(excess, len(self._history))
        del self._history[:dropped]
        del self._unread[: excess - dropped]
        self._drop_alerts(self._written - len(self._history) - len(self._unread))

    def write(self, logged: Logged, *, next_step: int) -> None:
        """Assemble the record of a logged step from its host values, raise its alerts, keep and write it.

        `next_step` is the first step whose backward has not run yet: the one a non-finite step re-checks.
        """
        # The table as one float64 array: the entries are computed over its columns (`summary`).
        got, step = logged.flight.values(arrays=("columns",)), logged.step
        record = logged.record(got)
        modules, params = record.modules, record.params
        alerts = self.rules.check_columns(step, modules.names, modules.column("norm_pre_clip"), got["total_norm"])
        recheck = None if logged.events is None else (logged.events, got.get("recheck", []))
        names, entries = (params.names, params.to_dict()) if _maybe_nonfinite(params) else ([], {})
        alerts += self.nonfinite.alerts(
            step, names, entries, skipped_since=int(got["skipped_steps"]), last_logged=logged.last_logged,
            recheck=recheck, next_step=next_step,
        )  # fmt: skip
        record.head["alerts"] = [a.to_dict() for a in alerts]
        self.raise_alerts(alerts)
        self.last_alerts = alerts
        self._unread.append(record)
        self._written += 1
        self._bound()
        self._reopen()  # a step after `close` (the same model tracked on): its run goes on in the same files
        for writer in self.writers:
            if isinstance(writer, JsonlWriter):
                writer.write_line(record.line())
            else:
                writer.write(record.to_dict(), logged.histograms)

    def alert(self, alert: Alert) -> None:
        """An alert found outside a logged step (a replay): logged, kept, and written to the file writers."""
        self.raise_alerts([alert])
        self.header({"type": "alert", "schema": SCHEMA, **alert.to_dict()})

    def raise_alerts(self, alerts: list[Alert]) -> None:
        """Log `alerts` at WARNING (if loud) and keep them in `alerts`."""
        for alert in alerts:
            if self.loud:
                logger.warning("%s [%s] %s", alert.kind, alert.name, alert.message)
        self._alerts.extend(alerts)
        self._ordinals.extend([self._written] * len(alerts))

    def start_run(self, names: list[str], *, every: int, meta: dict[str, Any]) -> None:
        """Write the run header: the parameters and modules tracked, the logging period and the run's settings.

        After `close` (a trainer's callback closes the tracker when a training ends, and the next training attaches
        it again) the writers open again, appending: the new run's header and records follow the previous run's.
        """
        modules = Layout.of(names).modules
        self.header({"type": "run", "schema": SCHEMA, "version": __version__, "time": time.time(), "every": every,
                     "params": names, "modules": modules, "meta": meta})  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The alert rules' state and every alert so far (the tracker's state holds both)."""
        return {"rules": self.rules.state_dict(), "alerts": [a.to_dict() for a in self.alerts]}

    def header(self, entry: dict[str, Any]) -> None:
        """Write a non-step entry (the run header, a replay's alert) to the file writers."""
        self._reopen()
        for writer in self.writers:
            if hasattr(writer, "path"):  # the file writers: TensorBoard takes step records only
                writer.write(entry)

    def has_tensorboard(self) -> bool:
        """Whether a TensorBoard writer writes this run's records (histograms are then made on detail steps);
        after `close` too, since the next record opens the writers again."""
        return self._log_dir is not None and "tensorboard" in self._writer_names

    def close(self) -> None:
        """Close every writer; the next record or run header opens them again, appending (`_reopen`)."""
        for writer in self.writers:
            writer.close()
        self.writers = []
        self._closed = True

    def _reopen(self) -> None:
        """Open the writers again after `close` (the JSONL file in append mode, TensorBoard in a new event file)."""
        if self._closed:
            self.writers = make_writers(self._writer_names, self._log_dir)
            self._closed = False


def _maybe_nonfinite(params: Entries) -> bool:
    """Whether some parameter's entry may say non-finite (`nonfinite` then reads the entries one by one)."""
    if params.known[_NAN] == ZEROS and params.known[_INF] == ZEROS:  # no NaN, no Inf: the healthy step
        return False
    nan, inf = params.column("nan"), params.column("inf")
    if None in nan or None in params.column("norm_pre_clip") or None in params.column("norm"):
        return True
    return any(nan) or any(inf)
