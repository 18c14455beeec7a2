"""What a `Tracker` counts between logging steps: clipped and skipped steps on the device, steps and bytes on the host.

A non-logging step costs the tracker two small device ops and no host read:
these counters are read with the rest of the record on the next logging step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradkit import _checks
from gradkit.step_report import StepReport

__all__ = ["SinceLastLog"]

_CLIP_TOLERANCE = 1e-6  # clip_coef below 1 - this counts as a clipped step (rounding leaves exact 1 alone)
_HOST = ("last_logged", "since", "bytes")
_DEVICE = ("clipped", "skipped")


class SinceLastLog:
    """Counters since the last logged step.

    Attributes:
        clipped, skipped: device tensors (int64), steps clipped and skipped.
        since: optimizer steps observed, this one included.
        bytes: payload bytes sent.
        last_logged: the step of the last log.

    Example:
        >>> counters = SinceLastLog()
        >>> counters.count(pipe.last)          # every step, no host read
        >>> counters.reset(step)               # after a log
    """

    def __init__(self) -> None:
        self.clipped: Tensor | None = None
        self.skipped: Tensor | None = None
        self.since = 0
        self.bytes = 0
        self.last_logged = 0

    def count(self, report: StepReport) -> None:
        """Count one step (two device ops)."""
        if self.clipped is None or self.clipped.device != report.clip_coef.device:
            self.clipped = torch.zeros((), dtype=torch.int64, device=report.clip_coef.device)
        if self.skipped is None or self.skipped.device != report.skipped.device:
            self.skipped = torch.zeros((), dtype=torch.int64, device=report.skipped.device)
        self.clipped += report.clip_coef < 1 - _CLIP_TOLERANCE
        self.skipped += report.skipped
        self.since += 1
        self.bytes += int(report.bytes_sent)

    def reset(self, step: int) -> None:
        """Start counting afresh after logged step `step`."""
        self.clipped.zero_()
        self.skipped.zero_()
        self.since, self.bytes, self.last_logged = 0, 0, step

    def state_dict(self) -> dict[str, Any]:
        zero = torch.zeros((), dtype=torch.int64)
        return {
            "last_logged": self.last_logged,
            "since": self.since,
            "bytes": self.bytes,
            "clipped": (self.clipped if self.clipped is not None else zero).clone(),
            "skipped": (self.skipped if self.skipped is not None else zero).clone(),
        }

    @staticmethod
    def check_state(state: dict[str, Any]) -> None:
        """Raise for a bad counter value in `state` (the Tracker's state), before anything is loaded."""
        for key in _HOST:
            _checks.non_negative_int(key, state[key], "pass the dict from Tracker.state_dict()")
        for key in _DEVICE:
            if not isinstance(state[key], Tensor) or state[key].numel() != 1:
                raise TypeError(
                    f"Tracker.load_state_dict: {key!r} must be a one-element tensor from Tracker.state_dict()"
                )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.last_logged, self.since, self.bytes = (int(state[k]) for k in _HOST)
        self.clipped = state["clipped"].detach().long().reshape(()).clone()
        self.skipped = state["skipped"].detach().long().reshape(()).clone()
