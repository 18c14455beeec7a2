"""PowerSGD carries `gk.Average`'s flags in its first factor (gloo on CPU, real processes).

A NaN/inf on one rank, a finite gradient whose factor overflows, and which ranks had each
gradient all reach every rank inside the first factor's all-reduce: no flag all-reduce goes
on the wire, and every rank makes the same decision.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradkit as gk
from dist_helpers import run_workers

WORLD = 2


def counted_floats(calls: list[tuple[int, torch.dtype]]) -> list[int]:
    """Bytes of each floating-point all-reduce (the int64 item count is the pipeline's)."""
    return [nbytes for nbytes, dtype in calls if dtype.is_floating_point]


def count_all_reduces() -> tuple[list[tuple[int, torch.dtype]], object]:
    calls: list[tuple[int, torch.dtype]] = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append((tensor.numel() * tensor.element_size(), tensor.dtype))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    return calls, original


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)


def nonfinite_and_overflow(rank: int, world: int) -> dict:
    results = {}
    for case in ("nan", "overflow"):
        model, compressor = mlp(), gk.PowerSGD(1)
        pipe = gk.GradientPipeline(model, average=gk.Average(compressor))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        calls, original = count_all_reduces()
        stepped, wire, sent = [], [], []
        try:
            for step in range(4):
                x, y = batch(rank, step)
                loss = ((model(x) - y) ** 2).sum()
                if step == 2 and rank == 0:
                    # nan: the loss is NaN; overflow: every gradient stays finite (checked below),
                    # but P = M·Q of the first layer exceeds the float64 range on this rank.
                    loss = loss * (float("nan") if case == "nan" else 1e306)
                if step == 2:
                    before = {k: {n: t.clone() for n, t in v.items()} for k, v in compressor.state_dict().items()}
                calls.clear()
                pipe.backward(loss)
                if step == 2 and case == "overflow" and rank == 0:
                    results["overflow/grads_finite"] = all(bool(p.grad.isfinite().all()) for p in model.parameters())
                stepped.append(pipe.step(opt))
                wire.append(counted_floats(calls))
                sent.append(pipe.last.bytes_sent)
                if step == 2:
                    after = compressor.state_dict()
                    results[f"{case}/state_kept"] = all(
                        torch.equal(before[field][name], after[field][name])
                        for field in before
                        for name in before[field]
                    ) and {k: set(v) for k, v in before.items()} == {k: set(v) for k, v in after.items()}
        finally:
            dist.all_reduce = original
        results[f"{case}/stepped"] = stepped
        results[f"{case}/wire"] = wire
        results[f"{case}/sent"] = [int(s) for s in sent]
        results[f"{case}/params"] = [p.detach().clone() for p in model.parameters()]
    return results


@pytest.fixture(scope="module")
def skips():
    return run_workers(nonfinite_and_overflow, WORLD, timeout=120)


@pytest.mark.parametrize("case", ["nan", "overflow"])
def test_a_bad_gradient_on_one_rank_skips_the_step_on_every_rank_with_state_kept(skips, case):
    for rank in skips:
        assert rank[f"{case}/stepped"] == [True, True, False, True]
        assert rank[f"{case}/state_kept"]  # residuals and Q as they were before the bad step
    for a, b in zip(skips[0][f"{case}/params"], skips[1][f"{case}/params"]):
        assert torch.equal(a, b)
    if case == "overflow":
        assert skips[0]["overflow/grads_finite"]  # finite on the rank: only the factor overflowed


@pytest.mark.parametrize("case", ["nan", "overflow"])
def test_no_flag_all_reduce_goes_on_the_wire(skips, case):
    # Rank 1: weights 16x12 and 3x16 as P (16 + 3 entries) then Q (12 + 16), biases (16 + 3) with P.
    first, second = (16 + 3 + 16 + 3) * 8, (12 + 16) * 8
    for rank in skips:
        # Every step, the bad one too: the two factors' all-reduces and nothing else.
        assert rank[f"{case}/wire"] == [[first, second]] * 4
        assert rank[f"{case}/sent"] == [first + second] * 4


# -- which ranks had a gradient ------------------------------------------------------------------


class TwoHeads(nn.Module):
    """A trunk and two heads; `use` says which heads the forward uses on this rank."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.trunk = nn.Linear(12, 16).double()
        self.a = nn.Linear(16, 10).double()
        self.b = nn.Linear(16, 10).double()
        self.use = ("a", "b")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x).tanh()
        return sum(getattr(self, head)(h) for head in self.use)


def presence(rank: int, world: int) -> dict:
    model, compressor = TwoHeads(), gk.PowerSGD(1)
    pipe = gk.GradientPipeline(model, average=gk.Average(compressor))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    results = {}
    for step, use in enumerate([("a", "b"), ("a", "b") if rank == 0 else ("a",), ("a",)]):
        model.use = use
        x, y = batch(rank, step)
        b_before = model.b.weight.detach().clone()
        residual_b = compressor.state_dict()["residuals"].get("b.weight", torch.zeros(0)).clone()
        pipe.backward(((model(x) - y[:, :1]) ** 2).sum())
        assert pipe.step(opt)
        results[step] = {
            "b_changed": not torch.equal(b_before, model.b.weight.detach()),
            "b_residual_kept": torch.equal(residual_b, compressor.state_dict()["residuals"]["b.weight"]),
        }
    results["params"] = [p.detach().clone() for p in model.parameters()]
    return results


def test_a_gradient_no_rank_had_stays_none_and_one_some_rank_had_is_averaged():
    outcome = run_workers(presence, WORLD, timeout=120)
    for rank in outcome:
        # Step 1: only rank 0 used head b; both step with the same average (params equal below).
        assert rank[1]["b_changed"]
        # Step 2: no rank used it: its gradient stays None, so AdamW (which has momentum and
        # weight decay for it by now) leaves it alone; a zero gradient would have moved it.
        assert not rank[2]["b_changed"]
        assert rank[2]["b_residual_kept"]  # nothing was sent for it: its residual waits
    assert outcome[1][1]["b_residual_kept"]  # rank 1 had no gradient for b in step 1
    assert not outcome[0][1]["b_residual_kept"]
    for a, b in zip(outcome[0]["params"], outcome[1]["params"]):
        assert torch.equal(a, b)


def signed_zeros(rank: int, world: int) -> dict:
    """Straight through the hook: a part sent as all -0.0 by a rank that has it still counts."""
    layout = (("w", (8, 6)), ("b", (5,)))  # w is compressed, and its P comes first in the payload
    results = {}
    for part, span in ((0, slice(0, 48)), (1, slice(48, 53))):
        for case, absent in (("other_has_minus_zeros", {0: [part], 1: []}), ("nobody", {0: [part], 1: [part]})):
            compressor = gk.PowerSGD(1)
            flat = torch.randn(53, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
            flat[span] = -0.0  # all -0.0 where a rank has it
            pending = compressor.start_reduce(
                flat, layout, dist.group.WORLD, 0.5, "test", None, bad=torch.tensor(False), absent=absent[rank]
            )
            summed = pending.wait()
            present = pending.present.tolist() if pending.present is not None else None
            results[f"{part}/{case}"] = (present, bool(summed.isfinite().all()))
    return results


@pytest.fixture(scope="module")
def zeros():
    return run_workers(signed_zeros, WORLD, timeout=60)


@pytest.mark.parametrize("part", [0, 1])
def test_presence_is_exact_for_a_gradient_of_negative_zeros(zeros, part):
    outcome = zeros
    assert outcome[0][f"{part}/other_has_minus_zeros"] == ([1.0], True)
    assert outcome[1][f"{part}/other_has_minus_zeros"] == (None, True)
    assert outcome[0][f"{part}/nobody"] == ([0.0], True) and outcome[1][f"{part}/nobody"] == ([0.0], True)


def test_a_finite_input_whose_factor_overflows_comes_back_not_finite():
    # One process, straight through the hook: every entry is finite, P = M·Q is not.
    compressor = gk.PowerSGD(1)
    flat = torch.full((40 * 30,), 1e308, dtype=torch.float64)
    summed = compressor.start_reduce(flat, (("w", (40, 30)),), None, 1.0, "test", None, bad=torch.tensor(False)).wait()
    assert bool(flat.isfinite().all()) and not bool(summed.isfinite().all())
    # ... and a finite one that does not overflow comes back as it went (rank 1 is exact here).
    ones = torch.ones(40 * 30, dtype=torch.float64)
    summed = gk.PowerSGD(1).start_reduce(ones, (("w", (40, 30)),), None, 1.0, "test", None, bad=torch.tensor(False))
    assert torch.allclose(summed.wait(), ones, rtol=0, atol=1e-12)


def test_a_step_no_rank_had_keeps_the_warm_start_q():
    # One process: the part is absent everywhere, so its Q sum is P̂ᵀ·0; the warm start must keep the
    # last Q (a zero Q would restart the power iteration from P = M·0).
    layout = (("w", (64, 32)),)
    generator = torch.Generator().manual_seed(0)
    compressor = gk.PowerSGD(2)
    for _ in range(3):
        flat = torch.randn(64 * 32, generator=generator)
        compressor.start_reduce(flat, layout, None, 1.0, "test", None, bad=torch.tensor(False)).wait()
        compressor.commit()
    before = compressor._q["w"].clone()
    pending = compressor.start_reduce(
        torch.zeros(64 * 32), layout, None, 1.0, "test", None, bad=torch.tensor(False), absent=[0]
    )
    pending.wait()
    compressor.commit()
    assert pending.present.tolist() == [0.0]
    assert torch.equal(compressor._q["w"], before)
