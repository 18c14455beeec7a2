"""The compressor interface: what goes on the wire, and how payloads of many ranks meet.

A compressor turns a dense tensor into a `Payload` (the tensors sent, plus what
is needed to rebuild a dense tensor locally) and back. Two kinds exist:

- linear compressors (FP16, BF16, RandomK with a seed shared by the ranks):
  the sum of payloads decompresses to the sum of the tensors, so payloads are
  all-reduced like dense gradients;
- the others (TopK, Threshold, DGC, QSGD, SignSGD): every rank's payload is
  all-gathered and each is decompressed and added up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

from gradkit import _checks
from gradkit._stateful import Stateful

__all__ = ["Compressor", "Payload", "check_density", "drain"]

_Entry = TypeVar("_Entry")


@dataclass
class Payload:
    """A compressed tensor.

    Attributes:
        tensors: what is sent to other ranks.
        shape, dtype: of the dense tensor it stands for.
        owner: the compressor that made it (decompressing with another one is an error).
        meta: local, non-wire facts needed to decompress (e.g. a random seed).
    """

    tensors: list[Tensor]
    shape: torch.Size
    dtype: torch.dtype
    owner: Compressor
    meta: dict[str, Any] = field(default_factory=dict)
    #: bytes on the wire when `tensors` are not what was sent (PowerSGD sends factors, keeps the product)
    wire_nbytes: int | None = None

    @property
    def nbytes(self) -> int:
        """Bytes on the wire."""
        if self.wire_nbytes is not None:
            return self.wire_nbytes
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


class Compressor(Stateful):
    """Base of every compressor: ``compress(tensor) -> Payload``, ``decompress(payload) -> tensor``."""

    #: payloads add up: ``decompress(sum of payloads) == sum of decompress(payload)``
    linear: bool = False
    #: E[decompress(compress(x))] != x: `gk.Average` wraps it in error feedback by default
    biased: bool = False
    #: payloads are (indices, values): many ranks' payloads decompress in one scatter
    sparse: bool = False
    #: payload sizes differ between ranks (all-gather needs a size exchange first)
    variable_size: bool = False
    #: keeps per-parameter state: ``compress(tensor, key=..., commit=...)``, then commit()/discard()
    keyed: bool = False

    def compress(self, tensor: Tensor) -> Payload:
        raise NotImplementedError

    def decompress(self, payload: Payload) -> Tensor:
        raise NotImplementedError

    def residual_(self, corrected: Tensor, payload: Payload) -> Tensor:
        """Turn `corrected` in place into ``corrected - decompress(payload)`` (what was not sent)."""
        return corrected.sub_(self.decompress(payload).view_as(corrected))

    def payload_for(self, tensors: list[Tensor], like: Payload) -> Payload:
        """A payload with other wire tensors (e.g. the sum over ranks) and `like`'s local facts."""
        return Payload(tensors, like.shape, like.dtype, like.owner, dict(like.meta))

    def commit(self) -> None:
        """Keep the state of deferred compress calls (stateless compressors: nothing)."""

    def discard(self) -> None:
        """Forget the state of deferred compress calls (stateless compressors: nothing)."""


    # -- checks shared by every compressor --

    def _check_input(self, tensor: object) -> Tensor:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{type(self).__name__}.compress expects a tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(
                f"{type(self).__name__}.compress expects a floating-point tensor, got {tensor.dtype}; "
                "gradients of integer tensors cannot be compressed"
            )
        return tensor

    def _check_payload(self, payload: object) -> Payload:
        if not isinstance(payload, Payload):
            raise TypeError(f"{type(self).__name__}.decompress expects a Payload from compress(), got {type(payload).__name__}")
        if payload.owner is not self and type(payload.owner) is not type(self):
            raise ValueError(
                f"{type(self).__name__}.decompress got a payload made by {type(payload.owner).__name__}; "
                "decompress with the compressor that compressed it"
            )
        return payload


def check_density(density: object) -> float:
    """`density` as a float in (0, 1]."""
    return _checks.number_in_range("density", density, 0.0, 1.0, "pass the fraction of entries to keep, e.g. 0.01")


def count_for(density: float, numel: int) -> int:
    """How many entries a density keeps of `numel` (at least one, none of an empty tensor)."""
    return min(numel, max(1, int(round(density * numel))))


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices where they fit: half the index bytes on the wire."""
    return torch.int32 if numel < 2**31 else torch.int64


def drain(pending: list[_Entry]) -> Iterator[_Entry]:
    """Pop `pending`'s entries oldest first until none is left.

    DDP completes a hook's futures on several threads, each of which commits: a
    check-then-pop could pop an entry another thread just took. `list.pop` is atomic.
    """
    while True:
        try:
            yield pending.pop(0)
        except IndexError:
            return
