"""Compressed averaging on real processes (gloo on CPU): against dense averaging and DDP."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradkit as gk
from dist_helpers import run_workers
from test_averaging import LR, data, full_batch_reference, make_model, max_diff, sum_loss

WORLD = 2


def train(
    rank: int, average: gk.Average | None, steps: int = 4, size: int = 6, model: nn.Module | None = None, lengths=None
):
    model = model if model is not None else make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    pipe = gk.GradientPipeline(model, average=average)
    for step in range(steps):
        n = lengths[rank][step] if lengths else size
        x, y = data(rank, step, n)
        pipe.backward(sum_loss(model, x, y), num_items=n)
        pipe.step(opt)
    return model, pipe


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def scenarios(rank: int, world: int) -> dict:
    results = {}
    dense, _ = train(rank, gk.Average(bucket_mb=0.002))

    # TopK keeping everything is dense averaging, through the all-gather path and error feedback.
    topk_all, pipe = train(rank, gk.Average(gk.TopK(1.0), bucket_mb=0.002))
    results["topk_all_vs_dense"] = max_diff(topk_all, dense)

    # Uneven items per rank: the weights make the compressed sum the global mean.
    lengths = {0: [1, 9, 4, 2], 1: [13, 2, 5, 3]}
    uneven, _ = train(rank, gk.Average(gk.TopK(1.0)), lengths=lengths)
    reference = full_batch_reference([[data(r, step, lengths[r][step]) for r in range(world)] for step in range(4)])
    results["uneven_topk_vs_full_batch"] = max_diff(uneven, reference)

    # A rank with no items in a step (tensor counts: only the global total must be > 0).
    model, counts = make_model(), {0: [0, 3, 4], 1: [5, 0, 2]}
    opt, pipe = torch.optim.SGD(model.parameters(), lr=LR), gk.GradientPipeline(model, average=gk.Average(gk.TopK(1.0)))
    for step in range(3):
        n = counts[rank][step]
        x, y = data(rank, step, n)
        pipe.backward(sum_loss(model, x, y), num_items=torch.tensor(n))
        assert pipe.step(opt), f"step {step} was skipped"
    reference = full_batch_reference([[data(r, step, counts[r][step]) for r in range(world)] for step in range(3)])
    results["empty_rank_topk_vs_full_batch"] = max_diff(model, reference)
    # ... and a rank without items keeps its residuals: at weight 0 nothing it selected was applied.
    model, average = make_model(), gk.Average(gk.TopK(0.3))
    opt, pipe = torch.optim.SGD(model.parameters(), lr=LR), gk.GradientPipeline(model, average=average)
    residuals = []
    for step in range(2):
        n = counts[rank][step]
        x, y = data(rank, step, n)
        pipe.backward(sum_loss(model, x, y), num_items=torch.tensor(n))
        assert pipe.step(opt)
        residuals.append(average.state_dict()["compressor"]["residuals"])
    results["empty_rank_residuals_unchanged"] = all(torch.equal(residuals[0][k], residuals[1][k]) for k in residuals[0])

    # AMP: compressor state in unscaled units while GradScaler doubles its scale every step.
    runs = {}
    for label, scaler in [
        ("plain", None),
        ("scaled", torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)),
    ]:
        model = make_model().float()
        opt, average = torch.optim.SGD(model.parameters(), lr=LR), gk.Average(gk.TopK(0.1), bucket_mb=0.002)
        pipe = gk.GradientPipeline(model, average=average, scaler=scaler)
        for step in range(4):
            x, y = data(rank, step, 6)
            pipe.backward(sum_loss(model, x.float(), y.float()), num_items=6)
            assert pipe.step(opt)
        runs[label] = (params_of(model), average.state_dict()["compressor"]["residuals"])
    results["amp_param_gap"] = max((a - b).abs().max().item() for a, b in zip(runs["scaled"][0], runs["plain"][0]))
    results["amp_residual_gap"] = max(
        (runs["scaled"][1][k] - runs["plain"][1][k]).abs().max().item() for k in runs["plain"][1]
    )

    # PowerSGD of rank 2 is exact when each rank's weight gradients have rank 1 (batch of 1).
    power, _ = train(rank, gk.Average(gk.PowerSGD(rank=2)), size=1)
    dense_b1, _ = train(rank, gk.Average(), size=1)
    results["powersgd_vs_dense"] = max_diff(power, dense_b1)

    # Every compressor leaves the replicas identical, and sends fewer bytes than dense.
    results["replicas"] = {}
    for name, compressor in [
        ("topk", gk.TopK(0.05)),
        ("randomk", gk.RandomK(0.1)),
        ("threshold", gk.Threshold(0.5)),
        ("dgc", gk.DGC(0.05)),
        ("qsgd", gk.QSGD(8)),
        ("sign", gk.SignSGD()),
        ("fp16", gk.FP16()),
        ("powersgd", gk.PowerSGD(1)),
    ]:
        model, pipe = train(rank, gk.Average(compressor, bucket_mb=0.002))
        results["replicas"][name] = (params_of(model), pipe.last.bytes_sent, pipe.last.dense_bytes)

    # A NaN on one rank: every rank skips, compressor state untouched (DGC: momentum, velocity).
    results["nan"] = {}
    for name, compressor in (("topk", gk.TopK(0.1)), ("dgc", gk.DGC(0.1)), ("powersgd", gk.PowerSGD(1))):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        average = gk.Average(compressor)
        pipe = gk.GradientPipeline(model, average=average)
        stepped, state_before, state_after = [], None, None
        for step in range(3):
            x, y = data(rank, 300 + step, 4)
            loss = sum_loss(model, x, y) / 4
            if step == 1:
                state_before = average.state_dict()["compressor"]
                if rank == 0:
                    loss = loss * float("nan")
            pipe.backward(loss)
            stepped.append(pipe.step(opt))
            if step == 1:
                state_after = average.state_dict()["compressor"]
        tensors = [
            (state_before[field][k], state_after[field][k])
            for field in state_before
            if field != "steps"
            for k in state_before[field]
        ]
        kept = (
            bool(tensors)
            and all(torch.equal(a, b) for a, b in tensors)
            and state_before.get("steps") == state_after.get("steps")
        )
        results["nan"][name] = (stepped, kept, params_of(model))
    return results


@pytest.fixture(scope="module")
def outcome():
    return run_workers(scenarios, WORLD, timeout=240)


def test_topk_keeping_everything_equals_dense(outcome):
    assert all(rank["topk_all_vs_dense"] < 1e-12 for rank in outcome)


def test_compressed_weighted_mean_is_the_full_batch_mean(outcome):
    assert all(rank["uneven_topk_vs_full_batch"] < 1e-12 for rank in outcome)


def test_a_rank_without_items_in_a_step_leaves_the_full_batch_mean(outcome):
    for rank in outcome:
        assert rank["empty_rank_topk_vs_full_batch"] < 1e-12
    # rank 1 had no items in the second step (counts[1] = [5, 0, ...]), rank 0 had 3
    assert outcome[1]["empty_rank_residuals_unchanged"] and not outcome[0]["empty_rank_residuals_unchanged"]


def test_compressed_averaging_under_amp_matches_the_unscaled_run(outcome):
    for rank in outcome:
        assert rank["amp_param_gap"] < 1e-6 and rank["amp_residual_gap"] < 1e-5, rank


def test_powersgd_at_the_gradient_rank_equals_dense(outcome):
    assert all(rank["powersgd_vs_dense"] < 1e-9 for rank in outcome)


@pytest.mark.parametrize("name", ["topk", "randomk", "threshold", "dgc", "qsgd", "sign", "fp16", "powersgd"])
def test_every_compressor_keeps_replicas_identical_and_sends_less(outcome, name):
    params0, bytes0, dense0 = outcome[0]["replicas"][name]
    params1, _, _ = outcome[1]["replicas"][name]
    for a, b in zip(params0, params1):
        assert torch.equal(a, b)
    assert dense0 == sum(p.numel() * p.element_size() for p in params0)
    assert 0 < bytes0 < dense0


@pytest.mark.parametrize("name", ["topk", "dgc", "powersgd"])
def test_nan_on_one_rank_skips_everywhere_and_keeps_residuals(outcome, name):
    (stepped_0, kept_0, params_0), (stepped_1, kept_1, params_1) = outcome[0]["nan"][name], outcome[1]["nan"][name]
    assert stepped_0 == stepped_1 == [True, False, True]
    assert kept_0 and kept_1
    for a, b in zip(params_0, params_1):
        assert torch.equal(a, b)


# -- the DDP communication hook ---------------------------------------------------------


def ddp_hooks(rank: int, world: int) -> dict:
    results = {}
    plain = DDP(make_model())
    plain_opt = torch.optim.SGD(plain.parameters(), lr=LR)
    hooked = {}
    for name, compressor in [
        ("identity", None),
        ("topk_all", gk.TopK(1.0)),
        ("topk", gk.TopK(0.1)),
        ("powersgd", gk.PowerSGD(1)),
    ]:
        model = DDP(make_model(), bucket_cap_mb=0.002)
        state, hook = gk.ddp_comm_hook(compressor, model=model)
        model.register_comm_hook(state, hook)
        hooked[name] = (model, torch.optim.SGD(model.parameters(), lr=LR), state)
    for step in range(4):
        x, y = data(rank, step, 6)
        for model, opt in [(plain, plain_opt)] + [(m, o) for m, o, _ in hooked.values()]:
            opt.zero_grad()
            (sum_loss(model, x, y) / 6).backward()
            opt.step()
    for name, (model, _, state) in hooked.items():
        results[name] = (max_diff(model.module, plain.module), params_of(model.module), state.bytes_sent)
    results["residual_names"] = sorted(hooked["topk"][2].state_dict()["compressor"]["residuals"])
    return results


@pytest.fixture(scope="module")
def hook_outcome():
    return run_workers(ddp_hooks, WORLD, timeout=180)


def test_ddp_hook_identity_and_full_topk_equal_plain_ddp(hook_outcome):
    for rank in hook_outcome:
        assert rank["identity"][0] < 1e-12
        assert rank["topk_all"][0] < 1e-12


def test_ddp_hook_compressed_keeps_replicas_identical_with_named_residuals(hook_outcome):
    for name in ("topk", "powersgd"):
        for a, b in zip(hook_outcome[0][name][1], hook_outcome[1][name][1]):
            assert torch.equal(a, b)
        assert hook_outcome[0][name][0] > 0  # compression really changed the result
    assert hook_outcome[0]["residual_names"] == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]


class DefinedBackwards(nn.Module):
    """Layers registered last to first: DDP's first buckets follow the reverse of the
    registration (first layer's parameters first), the rebuilt ones the order in which
    the backward produces gradients (last layer's first)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.last = nn.Linear(32, 3).double()
        self.middle = nn.Linear(32, 32).double()
        self.first = nn.Linear(6, 32).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.tanh(self.middle(torch.tanh(self.first(x)))))


def ddp_hook_rebuild(rank: int, world: int, compressor: str) -> dict:
    """Residuals under DDP's bucket rebuild: what the hook delivered plus the mean residual
    must equal the sum of the true averaged gradients (parameters held fixed)."""
    model = DDP(DefinedBackwards(), bucket_cap_mb=0.0005)
    state, gk_hook = gk.ddp_comm_hook(gk.TopK(0.1) if compressor == "topk" else gk.PowerSGD(1), model=model)
    layouts = []

    def recording_hook(hook_state, bucket):
        layouts.append((len(layouts), bucket.index(), tuple(id(p) for p in bucket.parameters())))
        return gk_hook(hook_state, bucket)

    model.register_comm_hook(state, recording_hook)
    names = [name for name, _ in model.module.named_parameters()]
    delivered = {name: torch.zeros_like(p) for name, p in model.module.named_parameters()}
    true_sum = {name: torch.zeros_like(p) for name, p in model.module.named_parameters()}
    per_step = []
    for step in range(6):
        x, y = data(rank, step, 5)
        local = torch.autograd.grad(sum_loss(model.module, x, y), list(model.module.parameters()))
        for name, g in zip(names, local):
            mean = g.clone()
            torch.distributed.all_reduce(mean)
            true_sum[name] += mean / world
        before = len(layouts)
        model.zero_grad(set_to_none=True)
        sum_loss(model, x, y).backward()  # no optimizer step: the gradients stay comparable
        per_step.append(sorted(entry[2] for entry in layouts[before:]))
        for name, p in model.module.named_parameters():
            delivered[name] += p.grad
    residuals = state.state_dict()["compressor"]["residuals"]
    gap = 0.0
    for name, p in model.module.named_parameters():
        mean_residual = residuals[name].reshape(p.shape).clone()
        torch.distributed.all_reduce(mean_residual)
        gap = max(gap, (delivered[name] + mean_residual / world - true_sum[name]).abs().max().item())
    return {"gap": gap, "layouts": per_step, "residual_names": sorted(residuals), "names": sorted(names)}


@pytest.mark.parametrize("compressor", ["topk", "powersgd"])
def test_ddp_hook_residuals_survive_the_bucket_rebuild(compressor):
    outcome = run_workers(ddp_hook_rebuild, WORLD, compressor, timeout=180)
    for rank in outcome:
        assert rank["layouts"][0] != rank["layouts"][-1]  # DDP really regrouped the parameters
        assert rank["layouts"][1:] == [rank["layouts"][-1]] * (len(rank["layouts"]) - 1)
        assert rank["residual_names"] == rank["names"]
        assert rank["gap"] < 1e-10, rank["gap"]


# -- one process ------------------------------------------------------------------------


def test_single_process_topk_gives_selective_updates():
    model = make_model()
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    train(0, gk.Average(gk.TopK(0.1)), steps=1, model=model)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    changed = int((after != before).sum())
    assert 0 < changed <= 0.16 * before.numel()  # about 10% per tensor (at most the 1.5x capacity)


def test_compressor_arguments_are_checked():
    with pytest.raises(TypeError, match="compressor must be"):
        gk.Average("topk")
    with pytest.raises(ValueError, match="error_feedback=True needs a compressor"):
        gk.Average(error_feedback=True)
    with pytest.raises(ValueError, match="process group"):
        gk.ddp_comm_hook(gk.TopK(0.1))
    assert isinstance(gk.Average(gk.TopK(0.1)).compressor, gk.ErrorFeedback)
    assert not isinstance(gk.Average(gk.TopK(0.1), error_feedback=False).compressor, gk.ErrorFeedback)
    assert isinstance(gk.Average(gk.DGC(0.1)).compressor, gk.DGC)
    # biased compressors get error feedback by default, unbiased and self-correcting ones do not
    for biased in (gk.Threshold(0.1), gk.SignSGD(), gk.RandomK(0.1, scale=False)):
        assert isinstance(gk.Average(biased).compressor, gk.ErrorFeedback), biased
    for unbiased in (gk.RandomK(0.1), gk.QSGD(4), gk.FP16(), gk.PowerSGD(1)):
        assert not isinstance(gk.Average(unbiased).compressor, gk.ErrorFeedback), unbiased


# -- native sparse gradients --------------------------------------------------------------


class Bag(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embedding = nn.Embedding(1000, 8, sparse=sparse, dtype=torch.float64)
        self.head = nn.Linear(8, 2, dtype=torch.float64)

    def forward(self, tokens):
        return self.head(self.embedding(tokens).mean(dim=1))


def sparse_embeddings(rank: int, world: int, compressor) -> dict:
    results = {}
    models = {}
    for sparse in (True, False):
        model = Bag(sparse)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        pipe = gk.GradientPipeline(
            model, accumulation_steps=2, average=gk.Average(gk.TopK(1.0) if compressor == "topk" else None)
        )
        g = torch.Generator().manual_seed(50 + rank)
        for _ in range(6):
            tokens = torch.randint(0, 40 + 400 * rank, (4, 5), generator=g)  # ranks touch overlapping rows
            target = torch.randn(4, 2, generator=g, dtype=torch.float64)
            # counts of 4 and 3: the mean's 1/14 is not exact in float32
            pipe.backward(((model(tokens) - target) ** 2).sum(), num_items=4 - rank)
            pipe.step(opt)
        models[sparse] = model
        results[f"bytes_{sparse}"] = pipe.last.bytes_sent
        results[f"dense_bytes_{sparse}"] = pipe.last.dense_bytes
    results["sparse_vs_dense"] = max_diff(models[True], models[False])
    return results


@pytest.mark.parametrize("compressor", [None, "topk"])
def test_sparse_embedding_gradients_average_like_dense_ones(compressor):
    # With a compressor the dense parameters are compressed (TopK(1.0): exactly) and the
    # sparse rows still averaged as rows, in the parameters' own precision.
    for rank in run_workers(sparse_embeddings, WORLD, compressor, timeout=120):
        assert rank["sparse_vs_dense"] < 1e-12
        assert rank["bytes_True"] < rank["bytes_False"] / 10  # rows, not the whole table
        assert rank["dense_bytes_True"] == rank["dense_bytes_False"]  # the reference is the dense table
