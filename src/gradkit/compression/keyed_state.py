"""Per-parameter state of stateful compressors, kept flat per call site but saved by name.

Error feedback, DGC and PowerSGD keep a tensor per parameter. Inside
`gk.Average` they compress whole buckets, so the state is stored as one flat
tensor per bucket (no gather/scatter per step) but saved and loaded per
parameter name, so a checkpoint loads on any bucket layout. When the layout
changes while training (DDP rebuilds its buckets after the first iteration, in
the order the backward produced the gradients), each parameter's state follows
it into its new bucket.

A *layout* names what a compressed tensor holds, with each part's shape:
``(("w1", (20, 15)), ("b1", (20,)))`` for a bucket of two parameters,
``(("w", tensor.shape),)`` for a single tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["KeyedState", "Layout", "check_named_tensors", "check_sizes", "layout_for", "named_fields", "sizes"]

Layout = tuple[tuple[str, tuple[int, ...]], ...]


def sizes(layout: Layout) -> list[int]:
    return [int(torch.Size(shape).numel()) for _, shape in layout]


def layout_for(key: str | Layout | None, tensor: Tensor) -> Layout:
    """The layout of `tensor` under `key` (a name, a layout, or None for a nameless tensor)."""
    if key is None:
        return (("", tuple(tensor.shape)),)
    if isinstance(key, str):
        return ((key, tuple(tensor.shape)),)
    if not (
        isinstance(key, tuple)
        and all(isinstance(part, tuple) and len(part) == 2 and isinstance(part[0], str) for part in key)
    ):
        raise TypeError(
            "key must be a parameter name (str), a layout of (name, shape) pairs, or None; "
            f"got {type(key).__name__} {key!r}"
        )
    total = sum(sizes(key))
    if total != tensor.numel():
        raise ValueError(
            f"key layout covers {total} entries but the tensor has {tensor.numel()}; pass the bucket's own layout"
        )
    return tuple(key)


def check_sizes(
    kept: Iterable[tuple[str, Mapping[str, int]]], numels: Mapping[str, int], where: str = "", *, loaded: bool = True
) -> None:
    """Refuse per-parameter state (a residual, a momentum: one entry per parameter entry) of another size
    than its parameter: the one check for state loaded through `gk.Average` and for state placed at first use.

    Args:
        kept: ``(field, {parameter name: entries kept})`` pairs.
        numels: entries per parameter name here; only these names are checked.
        where: what the message starts with (e.g. ``"Average.load_state_dict: "``).
        loaded: the state kept came from a checkpoint (the hint: load the one saved with the same
            parameters); False: from earlier calls (the hint: pass a distinct ``key=`` per tensor).

    Raises:
        ValueError: naming the field, the parameter and both sizes, before any state changes.

    Example:
        >>> check_sizes([("residuals", {"w": 6})], {"w": 8}, "Average.load_state_dict: ")
        Traceback (most recent call last):
        ValueError: Average.load_state_dict: the residuals kept for parameter 'w' must have 8 entries ...
    """
    for field, counts in kept:
        for name, size in numels.items():
            count = counts.get(name)
            if count is not None and count != size:
                owner = f"parameter {name!r}" if name else "a tensor compressed without key="
                raise ValueError(
                    f"{where}the {field} kept for {owner} must have {size} entries (its size here), "
                    f"got {count}; {_size_hint(field, loaded)}"
                )


def _size_hint(field: str, loaded: bool) -> str:
    """How to mend a size mismatch: state from a checkpoint, or from earlier calls under the same key."""
    if loaded:
        return "load the state saved with the same parameters (a parameter keeps its shape)"
    return f"pass a distinct key= per tensor (the {field} is kept per key)"


def check_named_tensors(owner: str, key: str, value: object) -> None:
    """A saved state entry must map parameter names to tensors; the error names `key`."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()):
        raise TypeError(
            f"{owner}.load_state_dict: {key!r} must map parameter names to tensors; "
            f"pass the dict from {owner}.state_dict()"
        )


def named_fields(state: object, **complete: bool) -> list[tuple[str, Any, bool]]:
    """`Compressor.named_state` of a saved dict: ``(field, {name: value}, complete)`` for each
    field given as ``field=complete`` that `state` holds as a dict (anything else is left to
    `load_state_dict` to refuse)."""
    if not isinstance(state, dict):
        return []
    return [(field, state[field], full) for field, full in complete.items() if isinstance(state.get(field), dict)]


class KeyedState:
    """Named flat tensors (e.g. "residual") per layout, saved per parameter name."""

    def __init__(self, fields: Sequence[str]) -> None:
        self.fields = tuple(fields)
        self._flat: dict[Layout, dict[str, Tensor]] = {}
        # Per name, from a checkpoint or from a layout given up: not yet placed in a layout.
        self._unplaced: dict[str, dict[str, Tensor]] = {}
        # The names whose unplaced state came from a checkpoint (a size mismatch then says to load another).
        self._loaded: set[str] = set()

    def __contains__(self, layout: Layout) -> bool:
        return layout in self._flat

    def get(self, layout: Layout, like: Tensor) -> dict[str, Tensor]:
        """The flat state tensors of `layout` (zeros, or what a checkpoint or an earlier layout held, at first use)."""
        state = self._flat.get(layout)
        if state is None:
            self._check_unplaced(layout)
            self._release_overlapping(layout)
            state = {field: self._initial(layout, field, like) for field in self.fields}
            self._flat[layout] = state
            self._loaded.difference_update(name for name, _ in layout)
        return state

    def replace(self, layout: Layout, field: str, tensor: Tensor) -> None:
        """Make `tensor` (flat, the layout's size) the `field` of `layout`, in place of a copy into it."""
        self.get(layout, tensor)[field] = tensor

    def _release_overlapping(self, layout: Layout) -> None:
        # Known layouts that share a parameter with the new one (the buckets were rebuilt)
        # give their state back per name, so it is placed in the new layouts, not lost.
        # Callers commit a step's state before the next step brings a new layout.
        names = {name for name, _ in layout}
        for other in [known for known in self._flat if names.intersection(name for name, _ in known)]:
            for field, flat in self._flat.pop(other).items():
                for (name, _), piece in zip(other, flat.split(sizes(other))):
                    self._unplaced.setdefault(field, {})[name] = piece

    def _check_unplaced(self, layout: Layout) -> None:
        # Checked before any state is moved or taken: a mismatch leaves the state as it was
        # (a wrong size would otherwise surface later as a broadcast error, or not at all).
        here = {name: size for (name, _), size in zip(layout, sizes(layout))}
        held = {name: size for known in self._flat for (name, _), size in zip(known, sizes(known))}
        for field in self.fields:
            kept = {**held, **{n: t.numel() for n, t in self._unplaced.get(field, {}).items()}}
            check_sizes([(field, {n: c for n, c in kept.items() if n in self._loaded})], here)
            check_sizes([(field, {n: c for n, c in kept.items() if n not in self._loaded})], here, loaded=False)

    def _initial(self, layout: Layout, field: str, like: Tensor) -> Tensor:
        pieces, fresh = [], True
        for (name, _), size in zip(layout, sizes(layout)):
            saved = self._unplaced.get(field, {}).pop(name, None)
            fresh = fresh and saved is None
            pieces.append(
                saved.reshape(-1).to(like)
                if saved is not None
                else torch.zeros(size, dtype=like.dtype, device=like.device)
            )
        if len(pieces) > 1:
            return torch.cat(pieces)
        # New zeros are the state itself: a clone would leave a freed block as large as the state,
        # which glibc's heap keeps mapped (measured: +4 B/param of resident memory under error feedback).
        return pieces[0] if fresh else pieces[0].clone()

    def state_dict(self) -> dict[str, Any]:
        saved: dict[str, dict[str, Tensor]] = {
            field: {k: v.clone() for k, v in self._unplaced.get(field, {}).items()} for field in self.fields
        }
        for layout, state in self._flat.items():
            for field, flat in state.items():
                for (name, _), piece in zip(layout, flat.split(sizes(layout))):
                    saved[field][name] = piece.clone()
        return saved

    def load_state_dict(self, state: dict[str, Any], owner: str) -> None:
        if not isinstance(state, dict) or set(state) != set(self.fields):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{owner}.load_state_dict: expected state fields {sorted(self.fields)}, got {got}")
        for field, by_name in state.items():
            if not isinstance(by_name, dict) or not all(isinstance(v, Tensor) for v in by_name.values()):
                raise TypeError(f"{owner}.load_state_dict: {field!r} must map parameter names to tensors")
        self._flat = {}
        self._unplaced = {field: dict(by_name) for field, by_name in state.items()}
        self._loaded = {name for by_name in state.values() for name in by_name}
