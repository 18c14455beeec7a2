"""Byte counts as text, in SI units as everywhere in gradkit's output: 1 kB = 1000 B, 1 MB = 10**6 B."""

from __future__ import annotations

__all__ = ["si_bytes"]


def si_bytes(count: float, *, spec: str = ".3g", sep: str = " ") -> str:
    """`count` bytes in the largest SI unit it reaches (B, kB, MB, GB), its number formatted with `spec`.

    Whole bytes are written as a whole number; a count never reads as a rounded "0.01 MB".

    Example:
        >>> si_bytes(5600), si_bytes(150_000, spec=".1f", sep=""), si_bytes(12)
        ('5.6 kB', '150.0kB', '12 B')
    """
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:{spec}}{sep}{unit}"
    return f"{count:.0f}{sep}B"
