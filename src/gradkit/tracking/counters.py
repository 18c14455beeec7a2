"""What a `Tracker` counts between logging steps: clipped and skipped steps on the device, steps and bytes on the host.

A non-logging step costs the tracker a few small device ops (five at most: two adds, and where a count is
still a bool, its conversion) and no host read:
these counters are read with the rest of the record on the next logging step.
The first step after a log makes no count of its own: its flags are the counts
(its clip test, and its report's skip flag as it is), so a tracker that logs every
step makes one device op a step here, and a reset makes none.
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
        self._fresh = True  # nothing counted on the device since the last reset: the next step's flags start over

    def count(self, report: StepReport) -> None:
        """Count one step (one device op on the first step after a reset, at most five after it).

        The report's tensors are read as they are then or at the next step's count (reports are values:
        they are not changed in place)."""
        clipped = report.clip_coef < 1 - _CLIP_TOLERANCE
        skipped = report.skipped
        if self._fresh:
            self.clipped, self.skipped, self._fresh = clipped, skipped, False
        else:  # out of place: the first step's flags may be bools (whose sum is an "or") or the report's own tensor
            self.clipped = _add(self.clipped, clipped)
            self.skipped = _add(self.skipped, skipped)
        self.since += 1
        self.bytes += int(report.bytes_sent)

    def reset(self, step: int) -> None:
        """Start counting afresh after logged step `step` (no device op: the next step's flags start over)."""
        self._fresh = True
        self.since, self.bytes, self.last_logged = 0, 0, step

    def state_dict(self) -> dict[str, Any]:
        zero = torch.zeros((), dtype=torch.int64)
        counts = (None, None) if self._fresh else (self.clipped, self.skipped)
        return {
            "last_logged": self.last_logged,
            "since": self.since,
            "bytes": self.bytes,
            "clipped": zero.clone() if counts[0] is None else counts[0].to(torch.int64, copy=True),
            "skipped": zero.clone() if counts[1] is None else counts[1].to(torch.int64, copy=True),
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
        self._fresh = False


def _add(total: Tensor, flag: Tensor) -> Tensor:
    """`total` + `flag` as an int64 count (a new tensor), with no wait: a 0-d tensor on the host (a count loaded
    from a checkpoint, a skip decided on the host) joins a device tensor as a number, read on the host."""
    if total.dtype == torch.bool:
        total = total.long()
    if total.device == flag.device or _on_host(total) or _on_host(flag):
        return total + flag
    return total + flag.to(total.device, non_blocking=True)  # two accelerators: rare, queued on the stream


def _on_host(value: Tensor) -> bool:
    return value.device.type == "cpu" and value.dim() == 0
