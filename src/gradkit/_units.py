"""Byte counts and ratios as text, in SI units as everywhere in gradkit's output: 1 kB = 1000 B, 1 MB = 10**6 B."""

from __future__ import annotations

__all__ = ["against_dense", "si_bytes", "times"]

_UNITS = (("B", 1.0), ("kB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12))
# Within 5% of the dense gradient's bytes: averaging without a compressor (the gradient plus a few bytes of counts).
_SAME = 1.05


def si_bytes(count: float, *, spec: str = ".3g", sep: str = " ") -> str:
    """`count` bytes in the largest SI unit it reaches (B, kB, MB, GB, TB), its number formatted with `spec`.

    Whole bytes are written as a whole number; a count never reads as a rounded "0.01 MB", and a number that
    rounds up to 1000 moves to the next unit ("1 MB", not "1e+03 kB").

    Example:
        >>> si_bytes(5600), si_bytes(150_000, spec=".1f", sep=""), si_bytes(12), si_bytes(999_999)
        ('5.6 kB', '150.0kB', '12 B', '1 MB')
    """
    level = max([0] + [i for i, (_, size) in enumerate(_UNITS) if count >= size])
    text = _number(count, level, spec)
    if float(text) >= 1000 and level + 1 < len(_UNITS):
        level += 1
        text = _number(count, level, spec)
    return f"{text}{sep}{_UNITS[level][0]}"


def _number(count: float, level: int, spec: str) -> str:
    return f"{count:.0f}" if level == 0 else f"{count / _UNITS[level][1]:{spec}}"


def times(ratio: float) -> str:
    """A ratio as "2.5x" (3 significant digits), and as a whole "1234x" from 100 on (never "1.23e+03x")."""
    return f"{ratio:.3g}x" if ratio < 100 else f"{ratio:.0f}x"


def against_dense(ratio: float) -> str:
    """What was sent against the dense gradient, from ``dense / sent``.

    Example:
        >>> against_dense(270.4), against_dense(0.5)
        ('270x less than the dense gradient', '2x more than the dense gradient')
    """
    if ratio >= _SAME:
        return f"{times(ratio)} less than the dense gradient"
    if ratio > 1 / _SAME:
        return f"about as much as the dense gradient (ratio {ratio:.2f}: not compressed)"
    return f"{times(1 / ratio)} more than the dense gradient"
