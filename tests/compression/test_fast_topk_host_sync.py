"""The fast top-k never waits for the host; error feedback wraps only stateless compressors."""

from __future__ import annotations

import pytest
import torch

import gradkit as gk
from compression_cases import gaussian

HOST_SYNCS = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__"]


def test_fast_topk_never_syncs_with_the_host(monkeypatch):
    x = gaussian(200_000, seed=3)

    def host_sync(*args, **kwargs):
        raise AssertionError("host sync in the fast top-k path")

    for name in HOST_SYNCS:
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    with pytest.raises(AssertionError):  # the trap is set
        bool(x[0] > 0)
    payload = gk.TopK(0.01).compress(x)
    monkeypatch.undo()
    assert "valid" in payload.meta  # it took the sampled-threshold path
    assert 1000 <= int(payload.meta["valid"].sum()) <= 3000


@pytest.mark.parametrize("inner", [gk.DGC(0.1), gk.PowerSGD(1), gk.ErrorFeedback(gk.TopK(0.1))])
def test_error_feedback_refuses_compressors_that_keep_their_own_residual(inner):
    with pytest.raises(TypeError, match="stateless compressor"):
        gk.ErrorFeedback(inner)
