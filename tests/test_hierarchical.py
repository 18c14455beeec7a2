"""Hierarchical averaging (gk.Average(node_size=...)): 4 gloo processes seen as 2 nodes x 2, float64."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradkit as gk
from dist_helpers import run_workers
from gradkit.averaging import hierarchical
from gradkit.averaging.hierarchical import HierarchicalReducer, NodeGroups, node_size_for
from gradkit.averaging.node_hops import GlooHops, NativeHops, gloo_carries

WORLD = 4
NODE = 2
LR = 0.1


class Net(nn.Module):
    """An MLP with a side branch that only some ranks use in some windows (missing gradients)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3))
        self.side = nn.Linear(6, 3)
        self.never = nn.Linear(6, 3)  # no rank ever uses it: its gradient must stay None

    def forward(self, x: torch.Tensor, side: bool = False) -> torch.Tensor:
        out = self.body(x)
        return out + self.side(x) if side else out


def make_model() -> Net:
    torch.manual_seed(0)
    return Net().double()


def data(rank: int, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(size, 6, generator=g, dtype=torch.float64)
    return x, torch.randn(size, 3, generator=g, dtype=torch.float64)


def sum_loss(model, x, y, side=False):
    return ((model(x, side) - y) ** 2).sum()


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


def small(compressor=None, node_size: int = NODE, **kwargs) -> gk.Average:
    # Small buckets: several buckets, and shards that split parameters and end in padding.
    return gk.Average(compressor, node_size=node_size, bucket_mb=0.003, first_bucket_mb=0.0005, **kwargs)


def against_ddp(rank: int, compressor, node_size: int = NODE) -> dict:
    """5 SGD steps of gradkit's hierarchical averaging against DDP over all 4 processes."""
    model, ddp = make_model(), DDP(make_model(), find_unused_parameters=True)
    opt, ddp_opt = torch.optim.SGD(model.parameters(), lr=LR), torch.optim.SGD(ddp.parameters(), lr=LR)
    average = small(compressor, node_size=node_size)
    pipe = gk.GradientPipeline(model, average=average)
    never_grads = []
    for step in range(5):
        x, y = data(rank, step, 8)
        side = step % 2 == 1 and rank == 3  # one rank of one node uses the side branch
        pipe.backward(sum_loss(model, x, y, side) / 8)
        pipe.step(opt)
        never_grads.append(model.never.weight.grad is None)
        ddp_opt.zero_grad()
        (sum_loss(ddp, x, y, side) / 8).backward()
        ddp_opt.step()
    return {
        "diff": max_diff(model, ddp.module),
        "reducer": type(average.reducer).__name__,
        "buckets": len(average.buckets),
        "never_none": never_grads,
        "bytes": pipe.last.bytes_sent,
        "dense_bytes": average.dense_bytes(),
    }


def ddp_hook(rank: int) -> dict:
    """DDP with gradkit's two-level hook against DDP's own all-reduce: 5 SGD steps, several buckets."""
    ddp = DDP(
        make_model(), bucket_cap_mb=0.002, find_unused_parameters=True
    )  # several buckets, shards that split parameters
    state, hook = gk.ddp_comm_hook(model=ddp, node_size=NODE)
    ddp.register_comm_hook(state, hook)
    reference = DDP(make_model(), bucket_cap_mb=0.002, find_unused_parameters=True)
    opt, ref_opt = torch.optim.SGD(ddp.parameters(), lr=LR), torch.optim.SGD(reference.parameters(), lr=LR)
    sent = []
    for step in range(5):
        x, y = data(rank, 400 + step, 8)
        for model, optimizer in ((ddp, opt), (reference, ref_opt)):
            optimizer.zero_grad()
            (sum_loss(model, x, y) / 8).backward()
            optimizer.step()
        sent.append(state.bytes_sent)
    return {"diff": max_diff(ddp.module, reference.module), "two_level": state.nodes is not None, "sent": sent}


def uneven(rank: int, compressor) -> float:
    """Uneven item counts per rank, accumulation and a flushed last window: the full-batch mean."""
    lengths = {0: [1, 9, 4, 2, 7], 1: [13, 2, 5, 3, 1], 2: [3, 3, 8, 1, 2], 3: [6, 1, 1, 10, 4]}
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    pipe = gk.GradientPipeline(model, accumulation_steps=2, average=small(compressor))
    for k, n in enumerate(lengths[rank]):
        x, y = data(rank, 100 + k, n)
        pipe.backward(sum_loss(model, x, y), num_items=n)
        pipe.step(opt)
    pipe.flush(opt)
    reference = make_model()
    for ks in ([0, 1], [2, 3], [4]):
        batches = [data(r, 100 + k, lengths[r][k]) for r in range(WORLD) for k in ks]
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        reference.zero_grad()
        (sum_loss(reference, x, y) / x.shape[0]).backward()
        with torch.no_grad():
            for p in reference.parameters():
                if p.grad is not None:
                    p -= LR * p.grad
    return max_diff(model, reference)


def nan_skip(rank: int, compressor) -> tuple[list[bool], list[torch.Tensor]]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    pipe = gk.GradientPipeline(model, average=small(compressor))
    stepped = []
    for step in range(3):
        x, y = data(rank, 200 + step, 4)
        loss = sum_loss(model, x, y) / 4
        if step == 1 and rank == 2:  # one rank of the second node only
            loss = loss * float("nan")
        pipe.backward(loss)
        stepped.append(pipe.step(opt))
    return stepped, [p.detach().clone() for p in model.parameters()]


def train(rank: int, model, opt, pipe, steps) -> None:
    for step in steps:
        x, y = data(rank, 300 + step, 8)
        pipe.backward(sum_loss(model, x, y, side=step % 2 == 0) / 8)
        pipe.step(opt)


def resume(rank: int) -> dict:
    """TopK(0.3) keeps a residual per shard: 4 steps straight equal 2 steps, a checkpoint, and 2 more."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    pipe = gk.GradientPipeline(model, average=small(gk.TopK(0.3)))
    train(rank, model, opt, pipe, range(2))
    saved = {"model": model.state_dict(), "opt": opt.state_dict(), "pipe": pipe.state_dict()}
    residuals = saved["pipe"]["average"]["compressor"]["residuals"]

    resumed = make_model()
    resumed.load_state_dict(saved["model"])
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=LR, momentum=0.9)
    resumed_opt.load_state_dict(saved["opt"])
    resumed_pipe = gk.GradientPipeline(resumed, average=small(gk.TopK(0.3)))
    resumed_pipe.load_state_dict(saved["pipe"])
    train(rank, resumed, resumed_opt, resumed_pipe, range(2, 4))
    return {
        "straight": [p.detach().clone() for p in make_straight(rank)],
        "resumed": [p.detach().clone() for p in resumed.parameters()],
        "residual_names": sorted(residuals),
        "residual_nonzero": any(bool(t.abs().sum() > 0) for t in residuals.values()),
    }


def make_straight(rank: int):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    pipe = gk.GradientPipeline(model, average=small(gk.TopK(0.3)))
    train(rank, model, opt, pipe, range(4))
    return model.parameters()


def bad_world(rank: int) -> dict:
    errors = {}
    for size in (3, 8):
        try:
            gk.Average(node_size=size)
        except ValueError as error:
            errors[size] = str(error)
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    errors["default"] = node_size_for(None, dist.group.WORLD)
    os.environ["LOCAL_WORLD_SIZE"] = "4"
    errors["default_one_node"] = node_size_for(None, dist.group.WORLD)
    del os.environ["LOCAL_WORLD_SIZE"]
    errors["unset"] = node_size_for(None, dist.group.WORLD)
    return errors


@contextlib.contextmanager
def pieces_of(size: int):
    """Dense shards cross nodes in pieces of `size` bytes (the tests' buckets are smaller than the default's)."""
    default = hierarchical.PIECE_BYTES
    hierarchical.PIECE_BYTES = size
    try:
        yield
    finally:
        hierarchical.PIECE_BYTES = default


@contextlib.contextmanager
def native_hops():
    """The hops NCCL takes (reduce_scatter_tensor, all_gather_into_tensor), which gloo runs too."""
    chosen = hierarchical.hops_for
    hierarchical.hops_for = lambda group, local_rank, owners, device_type: NativeHops(group, local_rank, owners)
    try:
        yield
    finally:
        hierarchical.hops_for = chosen


def hops(rank: int) -> dict:
    """Both kinds of node hops on buckets that split evenly or not: the node's sum of each shard, then every
    shard everywhere; the gather carries -0.0 and NaN as they are."""
    nodes = NodeGroups.build(NODE, None)
    first = rank - nodes.local_rank
    result: dict = {"picked": type(nodes.hops("cpu")).__name__}
    for kind, piece in ((GlooHops, None), (GlooHops, 2), (NativeHops, None), (NativeHops, 2)):
        node_hops = kind(nodes.node, nodes.local_rank, [first, first + 1])
        for size in (10, 11):
            per_shard = -(-size // NODE)
            padded = torch.zeros(per_shard * NODE, dtype=torch.float64)
            padded[:size] = torch.arange(size, dtype=torch.float64) * (rank + 1)
            shard = node_hops.shard_buffer(padded)
            pieces, others = node_hops.start_sum(padded, shard, piece)
            # The other shards' pieces come back too (in pieces on gloo: one all-reduce per piece of each shard).
            assert len(others) == (len(pieces) * (NODE - 1) if kind is GlooHops and piece else 0)
            for work in [work for _, work in pieces] + others:
                work.wait()
            summed = shard.clone()
            # The pieces are views of the shard, in order, that cover it.
            assert torch.equal(torch.cat([part for part, _ in pieces]), summed)
            assert sum(part.numel() for part, _ in pieces) == shard.numel()
            assert all(part.untyped_storage().data_ptr() == shard.untyped_storage().data_ptr() for part, _ in pieces)
            shard.copy_(torch.full_like(shard, float(rank)))
            shard[0], shard[1] = -0.0, float("nan")
            for work in node_hops.start_gather(padded, shard):
                work.wait()
            result[(kind.__name__, piece, size)] = {"summed": summed, "gathered": padded.clone(), "pieces": len(pieces)}
    return result


def scenarios(rank: int, world: int) -> dict:
    # Every scenario in one spawn: starting processes is the slow part.
    with native_hops():
        native = {
            "dense_native": against_ddp(rank, None),
            "topk_native": against_ddp(rank, gk.TopK(1.0)),
            "nan_native": nan_skip(rank, None),
            "hook_native": ddp_hook(rank),
        }
    with pieces_of(7 * 8):  # 7 float64 entries: shards of tens of entries cross in several pieces, the last one short
        pieces = {
            "dense_pieces": against_ddp(rank, None),
            "uneven_pieces": uneven(rank, None),
            "nan_pieces": nan_skip(rank, None),
            # One node of four: four shards summed piece by piece and four broadcasts, nothing crosses nodes.
            "one_node_pieces": against_ddp(rank, None, node_size=WORLD),
            "one_node_topk": against_ddp(rank, gk.TopK(0.1), node_size=WORLD),
        }
    return {
        **native,
        **pieces,
        "hops": hops(rank),
        "dense": against_ddp(rank, None),
        "topk": against_ddp(rank, gk.TopK(1.0)),
        "uneven_dense": uneven(rank, None),
        "uneven_topk": uneven(rank, gk.TopK(1.0)),
        "nan_dense": nan_skip(rank, None),
        "nan_topk": nan_skip(rank, gk.TopK(0.5)),
        "resume": resume(rank),
        "bad": bad_world(rank),
        "hook": ddp_hook(rank),
    }


@pytest.fixture(scope="module")
def outcome():
    return run_workers(scenarios, WORLD, timeout=300)


@pytest.mark.parametrize(
    "kind", ["dense", "topk", "dense_native", "topk_native", "dense_pieces", "one_node_pieces", "one_node_topk"]
)
def test_hierarchical_equals_ddp_over_all_processes(outcome, kind):
    for rank in outcome:
        result = rank[kind]
        assert result["reducer"] == "HierarchicalReducer"
        assert result["buckets"] >= 3
        assert result["diff"] < 1e-12
        assert result["never_none"] == [True] * 5  # no rank used it: None, as under DDP


@pytest.mark.parametrize("kind", ["hook", "hook_native"])
def test_two_level_ddp_hook_equals_ddp(outcome, kind):
    for rank in outcome:
        result = rank[kind]
        assert result["two_level"]
        assert result["diff"] < 1e-12
        assert all(0 < sent for sent in result["sent"])  # the last bucket's shard crossed nodes


def test_two_level_ddp_hook_refuses_a_compressor_before_any_process():
    with pytest.raises(ValueError, match=r"node_size=2\) averages in full precision only.*gk.Average"):
        gk.ddp_comm_hook(gk.TopK(0.1), node_size=2)
    with pytest.raises(ValueError, match="node_size must be >= 1"):
        gk.ddp_comm_hook(node_size=0)


def test_cross_node_bytes_are_a_shard(outcome):
    dense = outcome[0]["dense"]
    # Dense: each rank sends its half of every bucket (presence slots and padding aside) across nodes.
    assert 0.45 * dense["dense_bytes"] <= dense["bytes"] <= 0.6 * dense["dense_bytes"]


@pytest.mark.parametrize("kind", ["uneven_dense", "uneven_topk", "uneven_pieces"])
def test_uneven_items_give_the_full_batch_mean(outcome, kind):
    assert all(rank[kind] < 1e-12 for rank in outcome)


@pytest.mark.parametrize("kind", ["nan_dense", "nan_topk", "nan_native", "nan_pieces"])
def test_nan_on_one_rank_skips_on_all_four(outcome, kind):
    for stepped, params in (rank[kind] for rank in outcome):
        assert stepped == [True, False, True]
        for a, b in zip(params, outcome[0][kind][1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kind, piece", [("GlooHops", None), ("GlooHops", 2), ("NativeHops", None), ("NativeHops", 2)])
@pytest.mark.parametrize("size", [10, 11])
def test_node_hops_sum_then_gather_every_shard(outcome, kind, piece, size):
    per_shard = -(-size // NODE)
    for node in range(WORLD // NODE):
        ranks = [node * NODE + local for local in range(NODE)]
        node_sum = torch.zeros(per_shard * NODE, dtype=torch.float64)
        node_sum[:size] = torch.arange(size, dtype=torch.float64) * sum(r + 1 for r in ranks)
        for local, rank in enumerate(ranks):
            result = outcome[rank]["hops"][(kind, piece, size)]
            # gloo sums a shard of 5 or 6 entries in pieces of 2; the native reduce-scatter is one piece
            assert result["pieces"] == (-(-per_shard // piece) if kind == "GlooHops" and piece else 1)
            assert torch.equal(result["summed"], node_sum[local * per_shard : (local + 1) * per_shard])
            gathered = result["gathered"].view(NODE, per_shard)
            for owner, sender in enumerate(ranks):
                assert torch.signbit(gathered[owner, 0]) and gathered[owner, 0] == 0  # -0.0 stays -0.0
                assert torch.isnan(gathered[owner, 1])
                assert torch.equal(
                    gathered[owner, 2:], torch.full((per_shard - 2,), float(sender), dtype=torch.float64)
                )


def test_gloo_groups_take_the_in_place_hops(outcome):
    assert all(rank["hops"]["picked"] == "GlooHops" for rank in outcome)


@pytest.mark.parametrize(
    "backend, device_type, gloo",
    [("gloo", "cpu", True), ("nccl", "cuda", False), ("cpu:gloo,cuda:nccl", "cpu", True),
     ("cpu:gloo,cuda:nccl", "cuda", False), ("mpi", "cpu", False), ("cpu:gloo", "cpu", True),
     ("cpu:gloo,cuda:gloo", "cuda", True), ("cuda:nccl", "cpu", False), ("undefined", "cpu", False)],
)  # fmt: skip
def test_which_backends_take_the_gloo_hops(backend, device_type, gloo):
    assert gloo_carries(backend, device_type) is gloo


def test_resume_is_exact(outcome):
    for rank in outcome:
        result = rank["resume"]
        assert result["residual_nonzero"]
        for a, b in zip(result["straight"], result["resumed"]):
            assert torch.equal(a, b)
    # Each rank keeps the residuals of its own shards: local ranks 0 and 1 hold different pieces.
    assert outcome[0]["resume"]["residual_names"] != outcome[1]["resume"]["residual_names"]
    assert outcome[0]["resume"]["residual_names"] == outcome[2]["resume"]["residual_names"]


def test_world_not_a_multiple_of_node_size_is_refused(outcome):
    errors = outcome[0]["bad"]
    for size in (3, 8):
        assert f"world size 4 is not a multiple of node_size={size}" in errors[size]
    assert errors["default"] == 2  # torchrun's LOCAL_WORLD_SIZE
    assert errors["default_one_node"] is None  # one node: flat
    assert errors["unset"] is None


@pytest.mark.parametrize(
    "node_size, error, words",
    [(0, ValueError, "node_size must be >= 1, got 0"), (-2, ValueError, "got -2"), (1.5, TypeError, "integer"),
     (True, TypeError, "integer"), ("2", TypeError, "integer")],
)  # fmt: skip
def test_bad_node_size_is_refused_without_processes(node_size, error, words):
    with pytest.raises(error, match=words):
        gk.Average(node_size=node_size)


def test_one_process_ignores_node_size():
    average = gk.Average(node_size=2)
    assert not isinstance(average.reducer, HierarchicalReducer)


def test_powersgd_between_nodes_is_refused():
    with pytest.raises(ValueError, match="compresses whole matrices"):
        HierarchicalReducer(2, gk.PowerSGD(2), None)
