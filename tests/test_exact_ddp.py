"""Exactness on real model shapes against the real references, on 2 gloo processes in float64.

The references: DDP(find_unused_parameters=True) with ``no_sync`` for all but each
rank's last micro-step of a window, a one-process full-batch step, and torch's
PeriodicModelAverager. The models have a layer never used, a branch used on some
micro-batches and ranks only, a layer frozen mid-run, a frozen layer and a buffer,
and the ranks seed their models differently (setup must make the replicas equal).
The optimizer is AdamW with weight decay, whose update tells a None gradient from a zero.

Spawning a gloo group is the slow part, so one spawn runs many scenarios.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.algorithms.model_averaging.utils import average_parameters
from torch.nn.parallel import DistributedDataParallel as DDP

import gradkit as gk
from dist_helpers import run_workers

WORLD = 2
TOL = 1e-10
READS = ("item", "tolist", "__bool__", "numpy", "__float__", "__int__", "__index__")


class Net(nn.Module):
    """A trunk, a branch used on some micro-batches, a layer never used, a frozen layer, a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(5, 8)
        self.branch = nn.Linear(5, 8)
        self.never = nn.Linear(5, 8)
        self.late = nn.Linear(8, 8)  # frozen mid-run by some scenarios
        self.fixed = nn.Linear(5, 8)
        self.fixed.requires_grad_(False)
        self.head = nn.Linear(8, 3)
        self.register_buffer("shift", torch.randn(5))

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        x = x + self.shift
        h = torch.tanh(self.trunk(x) + self.fixed(x))
        if use_branch:
            h = h + torch.tanh(self.branch(x))
        return self.head(torch.tanh(self.late(h)))


def make_net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def batch(rank: int, window: int, micro: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * rank + 100 * window + micro)
    return torch.randn(rows, 5, generator=g, dtype=torch.float64), torch.randn(
        rows, 3, generator=g, dtype=torch.float64
    )


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, use_branch: bool, item_mode: bool) -> torch.Tensor:
    err = ((model(x, use_branch) - y) ** 2).sum(1)
    return err.sum() if item_mode else err.mean()


def optimizer(model: nn.Module, fused: bool | None = None) -> torch.optim.Optimizer:
    # fused=True: the pipeline leaves the non-finite skip to the optimizer, on the device.
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1, fused=fused)


# A scenario: K, item mode or not, and per window and rank the micro-batches as (rows, use_branch).
# Every rank knows the whole scenario, so the references can compute the global counts.


def reference_ddp(rank: int, scenario: dict) -> dict[str, torch.Tensor]:
    """DDP(find_unused_parameters=True), no_sync for all but each rank's last micro-step."""
    model = DDP(make_net(1 + rank), find_unused_parameters=True)
    opt = optimizer(model.module)
    for w, window in enumerate(scenario["windows"]):
        mine = window[rank]
        total = sum(rows for r in window for rows, _ in r) if scenario["item_mode"] else sum(len(r) for r in window)
        for m, (rows, use_branch) in enumerate(mine):
            x, y = batch(rank, w, m, rows)
            context = model.no_sync() if m + 1 < len(mine) else _nothing()
            with context:
                # DDP divides by the world size; the mean over the window divides by `total`.
                (loss_of(model, x, y, use_branch, scenario["item_mode"]) * WORLD / total).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if w + 1 == scenario.get("freeze_after"):
            model.module.late.requires_grad_(False)
    return _state(model.module)


def reference_full_batch(scenario: dict) -> dict[str, torch.Tensor]:
    """One process: each window's every micro-batch of every rank, one AdamW step on their mean loss."""
    model = make_net(1)  # rank 0's initial values: setup broadcasts them
    opt = optimizer(model)
    for w, window in enumerate(scenario["windows"]):
        total = sum(rows for r in window for rows, _ in r) if scenario["item_mode"] else sum(len(r) for r in window)
        for rank, mine in enumerate(window):
            for m, (rows, use_branch) in enumerate(mine):
                x, y = batch(rank, w, m, rows)
                (loss_of(model, x, y, use_branch, scenario["item_mode"]) / total).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if w + 1 == scenario.get("freeze_after"):
            model.late.requires_grad_(False)
    return _state(model)


def run_pipeline(
    rank: int, scenario: dict, kind: str, reads: list[int] | None = None, fused: bool | None = None
) -> dict[str, torch.Tensor]:
    """The same run through GradientPipeline with gk.Average or a DDP-wrapped model; each rank
    steps at its window's boundary or flushes a shorter window."""
    net = make_net(1 + rank)
    # DDP broadcasts buffers in the forward after a synced backward: a rank whose last window
    # is empty runs no such forward, so those runs need broadcast_buffers=False (as under DDP itself).
    buffers = _no_empty_window(scenario)
    model = DDP(net, find_unused_parameters=True, broadcast_buffers=buffers) if kind == "ddp" else net
    if kind == "ddp" and not buffers:
        dist.broadcast(net.shift, src=0)  # what DDP's construction would have copied
    pipe = gk.GradientPipeline(
        model, accumulation_steps=scenario["k"], average=gk.Average() if kind == "average" else None
    )
    opt = optimizer(net, fused)
    if reads is not None:
        opt.step = _uncounted(opt.step)  # AdamW reads its step counts: not the pipeline's reads
    _empty_flush(pipe, opt, net)  # before any data: empty on every rank
    for w, window in enumerate(scenario["windows"]):
        mine = window[rank]
        for m, (rows, use_branch) in enumerate(mine):
            x, y = batch(rank, w, m, rows)
            loss = loss_of(model, x, y, use_branch, scenario["item_mode"])
            pipe.backward(loss, num_items=rows if scenario["item_mode"] else None)
            before = _COUNTER["n"]
            stepped = pipe.step(opt)
            if reads is not None and m + 1 == scenario["k"]:
                reads.append(_COUNTER["n"] - before)
            assert not stepped or m + 1 == scenario["k"]
        if len(mine) < scenario["k"]:
            assert pipe.flush(opt)  # an empty window too: this rank joins the others' flush
        else:
            _empty_flush(pipe, opt, net)  # the window already stepped
        if w + 1 == scenario.get("freeze_after"):
            net.late.requires_grad_(False)
    return _state(net)


def _empty_flush(pipe: gk.GradientPipeline, opt: torch.optim.Optimizer, net: nn.Module) -> None:
    """A flush that must do nothing: False, and no parameter, gradient, optimizer state or count changed."""
    before, steps, state = _state(net), pipe.steps, _optimizer_state(opt)
    assert not pipe.flush(opt)
    assert _diff(_state(net), before) == 0.0
    assert pipe.steps == steps and _diff(_optimizer_state(opt), state) == 0.0
    assert all(p.grad is None for p in net.parameters())


def _optimizer_state(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.detach().clone() for i, entry in opt.state_dict()["state"].items() for k, v in entry.items()}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    state["never.weight.moved"] = torch.tensor(float(model.never.weight.grad is not None))
    return state


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


_COUNTER = {"n": 0}


def _uncounted(fn):
    def call(*args, **kwargs):
        before = _COUNTER["n"]
        try:
            return fn(*args, **kwargs)
        finally:
            _COUNTER["n"] = before

    return call


def _install_read_counter() -> None:
    for method in READS:
        original = getattr(torch.Tensor, method)

        def counting(self, *args, _original=original, **kwargs):
            _COUNTER["n"] += 1
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, method, counting)


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max().item() for k in a), default=0.0)


# -- the fixed scenarios ------------------------------------------------------------------


def _fixed_scenarios() -> dict[str, dict]:
    """Named scenarios that each break one of the old failure modes."""
    t, f = True, False
    return {
        # branch on some micro-batches only, a layer never used, frozen after window 2
        "unused_mean": {
            "k": 2,
            "item_mode": False,
            "freeze_after": 2,
            "windows": [[[(3, t), (3, f)], [(3, f), (3, f)]]] * 4,
        },
        "unused_items": {
            "k": 2,
            "item_mode": True,
            "freeze_after": 2,
            "windows": [[[(2, f), (4, t)], [(5, f), (1, f)]]] * 4,
        },
        # mean mode, rank 0 has 10 micro-batches and rank 1 has 9, K=4: last windows 2 and 1
        "uneven_mean": {
            "k": 4,
            "item_mode": False,
            "windows": [[[(2, t)] * 4, [(2, f)] * 4]] * 2 + [[[(2, t), (2, f)], [(2, f)]]],
        },
        # a gradient on one rank only in a flushed window, equal shapes (the silent mismatch)
        "flush_one_rank_branch": {
            "k": 3,
            "item_mode": True,
            "windows": [[[(2, f)] * 3, [(3, f)] * 3], [[(2, t), (1, f)], [(4, f)]]],
        },
        # rank 0 has 9 micro-batches and rank 1 has 8, K=4: rank 1's last window is empty
        "empty_last_mean": {
            "k": 4,
            "item_mode": False,
            "windows": [[[(2, t)] * 4, [(2, f)] * 4]] * 2 + [[[(2, t)], []]],
        },
        "empty_last_items": {
            "k": 4,
            "item_mode": True,
            "windows": [[[(2, f), (3, t), (1, f), (2, f)], [(1, f), (4, f), (2, t), (2, f)]]] * 2 + [[[(3, t)], []]],
        },
        # one rank's last window completes while the other's is flushed
        "complete_and_flushed": {
            "k": 3,
            "item_mode": False,
            "windows": [[[(2, t)] * 3, [(2, f)] * 3], [[(2, t)] * 3, [(2, t)]]],
        },
    }


def _no_empty_window(scenario: dict) -> bool:
    return all(mine for window in scenario["windows"] for mine in window)


def _complete_together(scenario: dict) -> bool:
    """DDP needs every rank's synced backward together: last windows all complete or all flushed."""
    return all(len({len(r) == scenario["k"] for r in window}) == 1 for window in scenario["windows"])


def fixed_worker(rank: int, world: int) -> dict:
    _install_read_counter()
    out = {}
    for name, scenario in _fixed_scenarios().items():
        reads: list[int] = []
        result = {
            # DDP cannot run a window empty on one rank (its backward all-reduces): the full batch stands in
            "ddp": reference_ddp(rank, scenario) if _no_empty_window(scenario) else reference_full_batch(scenario),
            "full": reference_full_batch(scenario),
            "average": run_pipeline(rank, scenario, "average", reads),
            "reads": reads,
            "average_fused": run_pipeline(rank, scenario, "average", fused=True),
        }
        if _complete_together(scenario):
            result["ddp_pipeline"] = run_pipeline(rank, scenario, "ddp")
            result["ddp_pipeline_fused"] = run_pipeline(rank, scenario, "ddp", fused=True)
        out[name] = result
    out["setup"] = setup_broadcast(rank)
    out["averager"] = model_averager_vs_torch(rank)
    return out


def setup_broadcast(rank: int) -> dict[str, dict[str, torch.Tensor]]:
    """Differently seeded ranks: what the replicas hold right after the pipeline is built."""
    with_buffers = make_net(1 + rank)
    gk.GradientPipeline(with_buffers, average=gk.Average())
    without = make_net(1 + rank)
    gk.GradientPipeline(without, average=gk.Average(broadcast_buffers=False))
    return {"with": _state(with_buffers), "without": _state(without), "own": _state(make_net(1 + rank))}


def model_averager_vs_torch(rank: int) -> dict[str, float]:
    """gk.ModelAverager against torch's PeriodicModelAverager (plus averaging every warm-up
    step, which torch leaves to DDP's gradient all-reduce)."""
    diffs = {}
    for period, warmup in ((3, 0), (3, 2), (2, 1)):
        ours, theirs = make_net(1 + rank), make_net(1 + rank)
        ours.never.requires_grad_(False)
        theirs.never.requires_grad_(False)
        pipe = gk.GradientPipeline(ours, average=gk.ModelAverager(period, warmup_steps=warmup))
        with torch.no_grad():  # the references start from rank 0's values, as DDP would
            for t in [*theirs.parameters(), *theirs.buffers()]:
                dist.broadcast(t, src=0)
        torch_averager = PeriodicModelAverager(period=period, warmup_steps=warmup)
        opt_ours, opt_theirs = optimizer(ours), optimizer(theirs)
        for step in range(1, 10):
            x, y = batch(rank, step, 0, 4)
            # Every trainable parameter used: torch's averager skips parameters without a gradient.
            pipe.backward(loss_of(ours, x, y, True, False))
            pipe.step(opt_ours)
            loss_of(theirs, x, y, True, False).backward()
            opt_theirs.step()
            trainable = [p for p in theirs.parameters() if p.requires_grad]
            if step <= warmup:
                average_parameters(trainable, dist.group.WORLD)
            torch_averager.average_parameters(trainable)
            opt_theirs.zero_grad(set_to_none=True)
        diffs[f"{period},{warmup}"] = _diff(_state(ours), _state(theirs))
    return diffs


@pytest.fixture(scope="module")
def fixed() -> list[dict]:
    return run_workers(fixed_worker, WORLD, timeout=300)


@pytest.mark.parametrize("name", list(_fixed_scenarios()))
def test_average_matches_ddp_and_the_full_batch(fixed, name):
    for rank_result in fixed:
        result = rank_result[name]
        assert _diff(result["average"], result["ddp"]) < TOL
        assert _diff(result["average"], result["full"]) < TOL
        assert _diff(result["ddp"], result["full"]) < TOL  # the references agree
    assert _diff(fixed[0][name]["average"], fixed[1][name]["average"]) == 0.0


@pytest.mark.parametrize("name", [n for n, s in _fixed_scenarios().items() if _complete_together(s)])
def test_ddp_wrapped_pipeline_matches_ddp(fixed, name):
    for rank_result in fixed:
        assert _diff(rank_result[name]["ddp_pipeline"], rank_result[name]["ddp"]) < TOL
    assert _diff(fixed[0][name]["ddp_pipeline"], fixed[1][name]["ddp_pipeline"]) == 0.0


@pytest.mark.parametrize("name", list(_fixed_scenarios()))
def test_fused_optimizer_pipelines_match_the_full_batch(fixed, name):
    """With fused AdamW the skip decision stays on the device: the result is the same."""
    for rank_result in fixed:
        result = rank_result[name]
        for kind in ("average_fused", "ddp_pipeline_fused"):
            if kind in result:
                assert _diff(result[kind], result["full"]) < TOL, kind
                assert _diff(fixed[0][name][kind], fixed[1][name][kind]) == 0.0, kind


def test_a_layer_no_rank_used_keeps_no_gradient_and_does_not_move(fixed):
    for rank_result in fixed:
        for name in ("unused_mean", "unused_items"):
            result = rank_result[name]
            for kind in ("average", "ddp_pipeline", "ddp", "average_fused", "ddp_pipeline_fused"):
                if kind not in result:
                    continue
                assert result[kind]["never.weight.moved"] == 0.0
                assert torch.equal(result[kind]["never.weight"], rank_result["setup"]["with"]["never.weight"])


def test_one_host_read_per_step_with_missing_gradients(fixed):
    for rank_result in fixed:
        for name in ("unused_mean", "unused_items", "uneven_mean"):
            assert rank_result[name]["reads"] and set(rank_result[name]["reads"]) == {1}, name


def test_setup_makes_parameters_frozen_ones_included_and_buffers_equal(fixed):
    zero, one = fixed[0]["setup"], fixed[1]["setup"]
    assert _diff(zero["with"], one["with"]) == 0.0
    assert torch.equal(one["with"]["fixed.weight"], zero["own"]["fixed.weight"])
    assert not torch.equal(zero["own"]["shift"], one["own"]["shift"])  # the seeds differ
    # broadcast_buffers=False: parameters equal, each rank keeps its own buffer
    assert torch.equal(zero["without"]["fixed.weight"], one["without"]["fixed.weight"])
    assert torch.equal(one["without"]["shift"], one["own"]["shift"])


def test_model_averager_matches_torch_periodic_model_averager(fixed):
    for rank_result in fixed:
        for schedule, diff in rank_result["averager"].items():
            assert diff < TOL, schedule


# -- the property test ------------------------------------------------------------------


def property_worker(rank: int, world: int, scenarios: list[dict]) -> list[tuple[float, float, float | None]]:
    out = []
    for scenario in scenarios:
        ddp = reference_ddp(rank, scenario)
        average = run_pipeline(rank, scenario, "average")
        wrapped = run_pipeline(rank, scenario, "ddp") if _complete_together(scenario) else None
        out.append(
            (
                _diff(average, ddp),
                _diff(average, reference_full_batch(scenario)),
                None if wrapped is None else _diff(wrapped, ddp),
            )
        )
    return out


@st.composite
def scenario_strategy(draw) -> dict:
    k = draw(st.integers(2, 3))
    item_mode = draw(st.booleans())
    micro = st.tuples(st.integers(1, 4), st.booleans())  # (rows, uses the branch)
    windows = [
        [draw(st.lists(micro, min_size=k, max_size=k)) for _ in range(WORLD)] for _ in range(draw(st.integers(0, 2)))
    ]
    windows.append([draw(st.lists(micro, min_size=1, max_size=k)) for _ in range(WORLD)])  # each rank's last window
    return {"k": k, "item_mode": item_mode, "windows": windows, "freeze_after": draw(st.sampled_from([None, 1]))}


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(scenario_strategy(), min_size=6, max_size=6))
def test_property_average_and_ddp_pipelines_match_ddp(scenarios):
    # Each example runs six scenarios in one process group: spawning is the slow part.
    results = run_workers(property_worker, WORLD, scenarios, timeout=300)
    for rank_results in results:
        for scenario, (average, full, wrapped) in zip(scenarios, rank_results):
            assert average < TOL, scenario
            assert full < TOL, scenario
            assert wrapped is None or wrapped < TOL, scenario
