"""Counting the ways a tensor's value can reach the host (each one waits for the device)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

READS = ("item", "tolist", "__bool__", "numpy", "__float__", "__int__", "__index__")


def count_host_reads(monkeypatch) -> dict[str, int]:
    """Patch every host read of torch.Tensor to count; returns the live counter {"n": ...}."""
    counter = {"n": 0}
    for method in READS:
        original = getattr(torch.Tensor, method)

        def counting(self, *args, _original=original, **kwargs):
            counter["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counting)
    return counter


def forbid_host_sync(monkeypatch) -> None:
    """Make every host read of a tensor's value raise while the patch is active."""

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} was called")

        return method

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


@contextlib.contextmanager
def no_cuda_syncs() -> Iterator[None]:
    """Any synchronizing CUDA call inside raises RuntimeError; the previous mode is restored after."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
