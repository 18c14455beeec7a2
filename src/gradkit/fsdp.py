"""Kept for imports written before the averaging package: FSDP2's sync control lives in `gradkit.averaging.fsdp`."""

from gradkit.averaging.fsdp import MODES, FSDPSync, check_average, is_fsdp

__all__ = ["FSDPSync", "is_fsdp", "check_average", "MODES"]
