"""Averaging across real processes (gloo on CPU), checked against DDP and a full-batch step."""

from __future__ import annotations

import collections
import datetime
import gc
import time
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode

import gradkit as gk
from dist_helpers import WorkerError, run_workers

WORLD = 2
LR = 0.1


def make_model(seed: int = 0, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 3)
    ).double()


def data(rank: int, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(size, 6, generator=g, dtype=torch.float64), torch.randn(
        size, 3, generator=g, dtype=torch.float64
    )


def sum_loss(model, x, y):
    return ((model(x) - y) ** 2).sum()


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


def full_batch_reference(windows: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> nn.Module:
    """One process, one SGD step per window on the mean loss over every item in it."""
    model = make_model()
    for window in windows:
        x = torch.cat([b[0] for b in window])
        y = torch.cat([b[1] for b in window])
        model.zero_grad()
        (sum_loss(model, x, y) / x.shape[0]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    return model


# -- one spawn runs several scenarios: starting processes is the slow part ----------------


def scenarios(rank: int, world: int) -> dict:
    results = {}

    # 1. Equal batches and a mean loss: identical to DDP after several SGD steps.
    model, ddp = make_model(), DDP(make_model())
    opt, ddp_opt = torch.optim.SGD(model.parameters(), lr=LR), torch.optim.SGD(ddp.parameters(), lr=LR)
    average = gk.Average(bucket_mb=0.002, first_bucket_mb=0.0005)
    pipe = gk.GradientPipeline(model, average=average)
    for step in range(5):
        x, y = data(rank, step, 8)
        pipe.backward(sum_loss(model, x, y) / 8)
        pipe.step(opt)
        ddp_opt.zero_grad()
        (sum_loss(ddp, x, y) / 8).backward()
        ddp_opt.step()
    results["vs_ddp"] = max_diff(model, ddp.module)
    results["buckets"] = len(average.buckets)
    results["launches"] = list(average.launches)
    results["num_params"] = len(list(model.parameters()))
    results["bytes_sent"] = pipe.last.bytes_sent

    # 2. K micro-batches + averaging equals DDP with a K-times larger batch.
    model, ddp = make_model(), DDP(make_model())
    opt, ddp_opt = torch.optim.SGD(model.parameters(), lr=LR), torch.optim.SGD(ddp.parameters(), lr=LR)
    pipe = gk.GradientPipeline(model, accumulation_steps=3, average=gk.Average(bucket_mb=0.002))
    for step in range(3):
        micro = [data(rank, 10 * step + k, 4) for k in range(3)]
        for x, y in micro:
            pipe.backward(sum_loss(model, x, y) / 4)
            pipe.step(opt)
        ddp_opt.zero_grad()
        x, y = torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro])
        (sum_loss(ddp, x, y) / 12).backward()
        ddp_opt.step()
    results["accumulated_vs_ddp"] = max_diff(model, ddp.module)

    # 3. Uneven per-rank item counts and an uneven flushed window: the full-batch mean.
    lengths = {0: [1, 9, 4, 2, 7], 1: [13, 2, 5, 3, 1]}  # K=2: windows of 2, 2 and a flushed 1
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    pipe = gk.GradientPipeline(model, accumulation_steps=2, average=gk.Average(bucket_mb=0.002))
    for k, n in enumerate(lengths[rank]):
        x, y = data(rank, 100 + k, n)
        pipe.backward(sum_loss(model, x, y), num_items=n)
        pipe.step(opt)
    pipe.flush(opt)
    windows = [[data(r, 100 + k, lengths[r][k]) for r in range(world) for k in ks] for ks in ([0, 1], [2, 3], [4])]
    results["uneven_vs_full_batch"] = max_diff(model, full_batch_reference(windows))
    results["uneven_items"] = int(pipe.last.items)

    # 4. A DDP-wrapped model in the pipeline: no_sync on early micro-steps, same full-batch result.
    ddp = DDP(make_model())
    calls = []

    def counting_hook(state, bucket):
        calls.append(bucket.index())
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    pipe = gk.GradientPipeline(ddp, accumulation_steps=2)
    for k, n in enumerate(lengths[rank]):
        x, y = data(rank, 100 + k, n)
        pipe.backward(sum_loss(ddp, x, y), num_items=n)
        pipe.step(opt)
    pipe.flush(opt)
    results["ddp_pipeline_vs_full_batch"] = max_diff(ddp.module, full_batch_reference(windows))
    results["ddp_comm_calls"] = len(calls)
    results["ddp_names"] = pipe.names[:2]

    # 5. A NaN on one rank only: every rank skips the same step.
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    pipe = gk.GradientPipeline(model, average=gk.Average())
    stepped = []
    for step in range(3):
        x, y = data(rank, 200 + step, 4)
        loss = sum_loss(model, x, y) / 4
        if step == 1 and rank == 1:
            loss = loss * float("nan")
        pipe.backward(loss)
        stepped.append(pipe.step(opt))
    results["nan_stepped"] = stepped
    results["nan_params"] = [p.detach().clone() for p in model.parameters()]

    # 6. Hooks per bucket under a changing graph: the order of two branches swaps from step to
    # step and rank 1 leaves branch b out on some steps. Every bucket still gets its gradients.
    results.update(changing_graph(rank))
    return results


class Branches(nn.Module):
    """Two branches whose backward order swaps with `swap`; branch b can be left out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        self.b = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        self.swap, self.use_b = False, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = (self.b, self.a) if self.swap else (self.a, self.b)
        if not self.use_b:
            return self.a(x)
        return second(first(x).tanh().sum(1, keepdim=True) * x)


def changing_graph(rank: int) -> dict:
    model, reference = Branches(), Branches()
    ddp = DDP(reference, find_unused_parameters=True)
    opt, ddp_opt = torch.optim.SGD(model.parameters(), lr=LR), torch.optim.SGD(ddp.parameters(), lr=LR)
    average = gk.Average(bucket_mb=0.001, first_bucket_mb=0.0005)
    pipe = gk.GradientPipeline(model, average=average)
    per_bucket_windows = 0
    for step in range(8):
        x, y = data(rank, 300 + step, 4)
        for m in (model, reference):
            m.swap, m.use_b = step % 3 == 2, not (rank == 1 and step in (3, 4))
        pipe.backward(sum_loss(model, x, y) / 4)
        per_bucket_windows += average._schedule._per_bucket
        pipe.step(opt)
        ddp_opt.zero_grad(set_to_none=True)
        (sum_loss(ddp, x, y) / 4).backward()
        ddp_opt.step()
    return {"graph_vs_ddp": max_diff(model, reference), "per_bucket_windows": per_bucket_windows}


@pytest.fixture(scope="module")
def outcome():
    return run_workers(scenarios, WORLD, timeout=180)


def test_equal_batches_match_ddp(outcome):
    for rank in outcome:
        assert rank["vs_ddp"] < 1e-10
        assert rank["buckets"] >= 3  # several buckets really were used


def test_hooks_per_bucket_follow_a_changing_graph_exactly(outcome):
    for rank in outcome:
        assert rank["graph_vs_ddp"] < 1e-10
        assert rank["per_bucket_windows"] >= 2  # the hooks per bucket really watched some windows


def test_first_bucket_launches_before_backward_finishes(outcome):
    launches = outcome[0]["launches"]
    assert [bucket for bucket, _ in launches] == list(range(outcome[0]["buckets"]))
    first_bucket, ready_at_launch = launches[0]
    assert ready_at_launch < outcome[0]["num_params"]  # other gradients were still to come
    assert outcome[0]["bytes_sent"] > 0


def test_accumulation_plus_averaging_matches_ddp_with_larger_batch(outcome):
    assert all(rank["accumulated_vs_ddp"] < 1e-10 for rank in outcome)


def test_uneven_items_give_the_full_batch_mean(outcome):
    for rank in outcome:
        assert rank["uneven_vs_full_batch"] < 1e-10
        assert rank["uneven_items"] == 7 + 1  # the flushed window: one micro-batch per rank


def test_ddp_wrapped_model_syncs_only_at_the_boundary(outcome):
    for rank in outcome:
        assert rank["ddp_pipeline_vs_full_batch"] < 1e-10
        assert rank["ddp_comm_calls"] == 2  # two full windows; the flush reduces by hand
        assert rank["ddp_names"] == ["0.weight", "0.bias"]  # DDP's "module." prefix dropped


def test_nan_on_one_rank_skips_everywhere(outcome):
    assert outcome[0]["nan_stepped"] == outcome[1]["nan_stepped"] == [True, False, True]
    for a, b in zip(outcome[0]["nan_params"], outcome[1]["nan_params"]):
        assert torch.equal(a, b)


# -- local SGD --------------------------------------------------------------------------


def local_sgd(rank: int, world: int) -> list[tuple[int, float, float]]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    averager = gk.ModelAverager(period=2, warmup_steps=1)
    report = []
    for step in range(1, 6):
        x, y = data(rank, step, 8)
        opt.zero_grad()
        (sum_loss(model, x, y) / 8).backward()
        opt.step()
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        averager.after_step(model.parameters())
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        everyone = [torch.empty_like(before) for _ in range(world)]
        dist.all_gather(everyone, before)
        mean = torch.stack(everyone).mean(0)
        report.append((step, (after - mean).abs().max().item(), (after - before).abs().max().item()))
    return report


def test_model_averager_averages_on_schedule():
    for rank_report in run_workers(local_sgd, WORLD, timeout=120):
        for step, from_mean, moved in rank_report:
            if step == 1 or step % 2 == 0:  # warm-up step, then the next one and every second one (as torch)
                assert from_mean < 1e-12, step
            else:
                assert moved == 0.0, step


def unfreezing(rank: int, world: int) -> dict:
    # Standalone local SGD whose parameter list grows (layers unfrozen) on every rank together, then a step
    # where the ranks pass lists of different lengths.
    model = make_model(seed=rank)  # different replicas: averaging shows
    averager = gk.ModelAverager(period=1, timeout=5)
    params = list(model.parameters())
    averager.after_step(params[:2])
    averager.after_step(params)  # every rank unfroze the rest: checked again, then averaged
    gathered = [torch.empty_like(params[-1]) for _ in range(world)]
    dist.all_gather(gathered, params[-1].detach())
    try:
        averager.after_step(params[:2] if rank == 0 else params)
        mismatch = "no error"
    except (ValueError, gk.CollectiveError) as error:
        mismatch = str(error)
    return {"last_equal": all(torch.equal(g, gathered[0]) for g in gathered), "mismatch": mismatch}


def test_model_averager_follows_a_parameter_list_changed_on_every_rank_and_refuses_different_ones():
    # A short group timeout too: after the mismatch the group's own teardown waits for it.
    for rank in run_workers(unfreezing, WORLD, timeout=120, pg_timeout=5):
        assert rank["last_equal"]  # the unfrozen layer was averaged too
        assert "gk.ModelAverager" in rank["mismatch"] and "between 2 and 6 parameters" in rank["mismatch"]


class HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value on the host (``item()``, ``bool()``, ``float()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def averaging_costs(rank: int, world: int) -> dict:
    # Per step, averaging every step: the all-reduces, `tolist` reads (which dispatch no operator) and
    # host reads, in a pipeline with a fused optimizer (its step skips on the device: no host read of its
    # own after the first) and on its own.
    counted = collections.Counter()
    all_reduce, tolist = dist.all_reduce, torch.Tensor.tolist

    def counting_all_reduce(*args, **kwargs):
        counted["all_reduce"] += 1
        return all_reduce(*args, **kwargs)

    def counting_tolist(tensor):
        counted["tolist"] += 1
        return tolist(tensor)

    def measure(step) -> list[dict]:
        steps = []
        for _ in range(4):
            reads = HostReads()
            dist.all_reduce, torch.Tensor.tolist = counting_all_reduce, counting_tolist
            try:
                with reads:
                    step()
            finally:
                dist.all_reduce, torch.Tensor.tolist = all_reduce, tolist
            steps.append({**counted, "reads": reads.count})
            counted.clear()
        return steps

    model = make_model()
    pipe = gk.GradientPipeline(model, average=gk.ModelAverager(1, timeout=30))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def pipeline_step():
        pipe.backward(sum_loss(model, *data(rank, 1, 4)))
        pipe.step(opt)

    params = list(model.parameters())
    alone = gk.ModelAverager(1, timeout=30)
    return {
        "pipeline": measure(pipeline_step),
        "alone": measure(lambda: alone.after_step(params)),  # the same list object, never attached: checked
        "pipeline_same_tensors": measure(lambda: pipe.sync.after_step(list(params))),  # another list, same tensors
        "pipeline_other_tensors": measure(lambda: pipe.sync.after_step(list(params)[:-1])),  # one fewer: checked
    }


def test_model_averager_in_a_pipeline_averages_with_one_all_reduce_and_no_host_read():
    for result in run_workers(averaging_costs, WORLD, timeout=120):
        # The first step keeps the pipeline's own read (a fused optimizer without state yet).
        assert result["pipeline"][1:] == [{"all_reduce": 1, "reads": 0}] * 3, result["pipeline"]
        # Used on its own, or given other tensors, each averaging is checked: one more all-reduce, read on the host.
        assert result["alone"][1:] == [{"all_reduce": 2, "tolist": 1, "reads": 0}] * 3, result["alone"]
        assert result["pipeline_other_tensors"] == [{"all_reduce": 2, "tolist": 1, "reads": 0}] * 4
        # The attached tensors in a list of the caller's own (a notebook's second pipeline on the same model).
        assert result["pipeline_same_tensors"] == [{"all_reduce": 1, "reads": 0}] * 4


def refused(call) -> tuple[str, float]:
    """(the ValueError's message, or "no error", and the seconds the call took)."""
    started = time.monotonic()
    try:
        call()
        message = "no error"
    except ValueError as error:
        message = str(error)
    return message, time.monotonic() - started


def different_lists(rank: int, world: int) -> dict:
    # Each case, on every rank, must end in the same ValueError well within the 30 s timeout (a wait
    # for a collective the peer never runs would end in a CollectiveError after it), and leave the group
    # usable for the next case: every rank ran the same collectives.
    results = {}
    model = make_model()
    params = list(model.parameters())
    averager = gk.ModelAverager(period=2, timeout=30)
    averager.after_step(params[:4])  # step 1 averages: the lists agree
    before = [p.detach().clone() for p in params]
    averager.after_step(params[:4] if rank == 0 else params[:5])  # step 2: no averaging, no collective
    results["more"] = refused(lambda: averager.after_step(params[:4] if rank == 0 else params[:5]))  # step 3
    results["untouched"] = all(torch.equal(p, b) for p, b in zip(params, before)) and averager.step == 2
    # The attached list changed in place on every rank (one more parameter, another on each): no longer the
    # list the setup checked, so it is checked again (skipped, the all-reduce would mix two shapes).
    attached = params[:4]
    fixed = gk.ModelAverager(1, timeout=30)
    fixed.attach([str(i) for i in range(4)], attached, broadcast=False)
    attached.append(params[4] if rank == 0 else params[5])
    results["appended"] = refused(lambda: fixed.after_step(attached))
    # Equal counts, other layers frozen: rank 0 trains layers 2 and 4, rank 1 layers 0 and 4.
    frozen = params[2:] if rank == 0 else params[:2] + params[4:]
    results["other_layer"] = refused(lambda: gk.ModelAverager(1, timeout=30).average_now(frozen))
    # Equal counts and entry counts, other shapes: a flat all-reduce would mix them silently.
    results["transposed"] = refused(lambda: gk.ModelAverager(1).average_now([torch.zeros((2, 3) if rank else (3, 2))]))
    results["dtype"] = refused(
        lambda: gk.ModelAverager(1).average_now([torch.zeros(3, dtype=torch.float64 if rank else torch.float32)])
    )
    # Through the pipeline: rank 1 trains the last bias, which rank 0 froze. The setup check sees it (the
    # frozen parameters are marked; unmarked, the lists were the same and the first average crashed gloo).
    model = make_model()
    model[4].bias.requires_grad_(rank == 1)
    for name, average in (("pipeline", gk.ModelAverager(1, timeout=30)), ("pipeline_average", gk.Average(timeout=30))):
        results[name] = refused(lambda average=average: gk.GradientPipeline(model, average=average))
    return results


def test_model_averager_refuses_lists_that_differ_across_ranks_on_every_rank_before_averaging():
    for rank, result in enumerate(run_workers(different_lists, WORLD, timeout=120)):
        assert result["untouched"]  # nothing was averaged at the refused step
        for case in ("more", "appended", "other_layer", "transposed", "dtype", "pipeline", "pipeline_average"):
            message, seconds = result[case]
            assert seconds < 10, (case, seconds)
            if case.startswith("pipeline"):
                assert "the ranks hold different models" in message, (case, message)
                assert "'4.bias (frozen)' [3]" in message and "with the same parameters frozen" in message, message
                continue
            assert message.startswith("gk.ModelAverager: the ranks pass"), (case, message)
            assert "freeze or unfreeze layers on all ranks alike" in message, (case, message)
        assert "between 4 and 5 parameters (this rank: " + ("4" if rank == 0 else "5") in result["more"][0]
        assert (
            "4 parameters each" in result["other_layer"][0]
            and "between 323 and 1155 entries" in result["other_layer"][0]
        )
        assert "1 parameters each" in result["transposed"][0] and "between 6 and 6 entries" in result["transposed"][0]
        assert "shapes or dtypes differ" in result["dtype"][0]
        assert "5 parameters each" in result["appended"][0]
        assert result["pipeline"][0].startswith("gk.ModelAverager") and result["pipeline_average"][0].startswith(
            "gk.Average"
        )


# -- setup checks and failures ----------------------------------------------------------


def mismatched_models(rank: int, world: int) -> str:
    model = make_model(hidden=32 if rank == 0 else 16)
    try:
        gk.GradientPipeline(model, average=gk.Average())
    except ValueError as error:
        return str(error)
    return "no error"


def test_mismatched_replicas_fail_at_setup_naming_the_parameter():
    for message in run_workers(mismatched_models, WORLD, timeout=120):
        assert "'0.weight' [32, 6]" in message and "[16, 6]" in message and "rank 1" in message


class RefusingTracker:
    """A tracker whose setup fails (as one that cannot write its log would), after the averager is attached."""

    def wants(self, step):
        return False

    def observe(self, ctx, report):
        pass

    def after_step(self, ctx, report):
        pass

    def attach(self, module, names, params, *, clip=()):
        raise ValueError("log_dir is not writable; pass a folder this process can write to")


def retried_pipelines(rank: int, world: int) -> dict:
    # Every rank's constructor fails after the averager was attached; the retry, with the same averager
    # object and good arguments, must build a pipeline that averages exactly.
    results = {}
    for name, average in (
        ("dense", gk.Average(timeout=30)),
        ("topk", gk.Average(gk.TopK(0.5), timeout=30)),
        ("local_sgd", gk.ModelAverager(1, timeout=30)),
    ):
        model = make_model()
        try:
            gk.GradientPipeline(model, average=average, tracker=RefusingTracker())
            results[f"{name}/first"] = "no error"
        except ValueError as error:
            results[f"{name}/first"] = str(error)
        pipe = gk.GradientPipeline(model, average=average)
        x, y = data(rank, 1, 4)
        reference = make_model()
        sum_loss(reference, x, y).backward()
        local = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
        everyone = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(everyone, local)
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        pipe.backward(sum_loss(model, x, y))
        pipe.step(torch.optim.SGD(model.parameters(), lr=LR))
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        mean = torch.stack(everyone).mean(0)
        if name == "dense":  # one gradient step on the mean gradient
            results[f"{name}/error"] = (after - (before - LR * mean)).abs().max().item()
        elif name == "local_sgd":  # each rank stepped on its own gradient, then the parameters were averaged
            own = [before - LR * g for g in everyone]
            results[f"{name}/error"] = (after - torch.stack(own).mean(0)).abs().max().item()
        gathered = [torch.empty_like(after) for _ in range(world)]
        dist.all_gather(gathered, after)
        results[f"{name}/replicas_equal"] = all(torch.equal(g, gathered[0]) for g in gathered)
        pipe.sync.detach()
    return results


def test_a_failed_pipeline_constructor_leaves_the_averager_free_for_a_corrected_retry():
    for result in run_workers(retried_pipelines, WORLD, timeout=120):
        for name in ("dense", "topk", "local_sgd"):
            assert result[f"{name}/first"].startswith("log_dir is not writable"), result[f"{name}/first"]
            assert result[f"{name}/replicas_equal"], name
        assert result["dense/error"] < 1e-12 and result["local_sgd/error"] < 1e-12, result


def not_a_member(rank: int, world: int) -> str:
    only_rank0 = dist.new_group([0])
    if rank == 1:
        try:
            gk.Average(group=only_rank0)
        except ValueError as error:
            return str(error)
    return "member"


def test_group_without_this_rank_is_rejected():
    messages = run_workers(not_a_member, WORLD, timeout=120)
    assert "not a member" in messages[1]


def dead_peer(rank: int, world: int, report_path: str) -> None:
    import os

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    pipe = gk.GradientPipeline(model, average=gk.Average(timeout=5))
    for step in range(4):
        x, y = data(rank, step, 4)
        if rank == 1 and step == 2:
            os._exit(1)  # dies without a word, mid-run
        started = time.monotonic()
        try:
            # Mean mode all-reduces the window's micro-step count before the boundary backward.
            pipe.backward(sum_loss(model, x, y) / 4)
            pipe.step(opt)
        except gk.CollectiveError as error:
            torch.save({"seconds": time.monotonic() - started, "message": str(error), "step": step}, report_path)
            raise


def test_dead_peer_is_a_clear_error_within_the_timeout(tmp_path):
    report_path = tmp_path / "survivor.pt"
    with pytest.raises(WorkerError):
        run_workers(dead_peer, WORLD, str(report_path), timeout=120)
    report = torch.load(report_path)
    assert report["step"] == 2
    assert report["seconds"] < 30
    assert "gk.Average" in report["message"] and "peer" in report["message"]


def destroy_while_the_pipeline_lives(rank, world):
    group = dist.new_group(list(range(world)))
    model = nn.Linear(4, 2)
    average, clip, averager = (
        gk.Average(group=group),
        gk.ClipByGlobalNorm(1.0, group=group),
        gk.ModelAverager(2, group=group),
    )
    pipe = gk.GradientPipeline(model, average=average, clip=clip)
    pipe.backward(model(torch.randn(3, 4)).square().sum())
    pipe.step(torch.optim.SGD(model.parameters(), lr=0.1))
    ref = weakref.ref(group)
    del group
    dist.destroy_process_group(ref())
    gc.collect()
    return {
        "destroyed": ref() is None,
        "forgotten": [x.group is None for x in (average, clip, averager)],
        "pipe": pipe is not None,
    }


def test_a_live_pipeline_keeps_no_destroyed_group_alive():
    # destroy_process_group() must free the group's threads and sockets even while a pipeline lives.
    for result in run_workers(destroy_while_the_pipeline_lives, WORLD):
        assert result == {"destroyed": True, "forgotten": [True, True, True], "pipe": True}


def hold_work_handles(rank, world):
    results = {}
    for name, compressor in (("dense", None), ("topk", gk.TopK(0.5))):
        model = nn.Linear(4, 2)
        average = gk.Average(compressor, first_bucket_mb=1e-6)  # two buckets: weight and bias
        pipe = gk.GradientPipeline(model, average=average)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        held = []
        for _ in range(2):
            pipe.backward(model(torch.randn(3, 4)).square().sum())
            pipe.step(optimizer)
            held.append(list(average._finished))
        results[name] = {
            "held": [len(h) for h in held],
            "completed": all(work.is_completed() for h in held for work in h),
            "replaced": not {id(w) for w in held[0]} & {id(w) for w in held[1]},
        }
    results["run"] = [work.is_completed() for work in gk.distributed._kept]
    gk.distributed._kept.clear()
    model = DDP(nn.Linear(4, 2))
    model.register_comm_hook(*gk.ddp_comm_hook(gk.TopK(0.5), model=model))
    model(torch.randn(3, 4)).square().sum().backward()
    # Gloo may mark a work completed a moment after its future (which DDP waited on) is done.
    kept = list(gk.distributed._kept)
    results["ddp"] = [len(kept), all(work.wait(timeout=datetime.timedelta(seconds=30)) for work in kept)]
    return results


def test_finished_work_handles_are_released_by_this_thread_later():
    # If gloo's worker thread drops the last reference to a work during interpreter exit, the
    # process aborts (see distributed.keep): the handles of a window stay with the
    # Average until the next reduction, those of other collectives (and the DDP hook's) in a bounded queue.
    for result in run_workers(hold_work_handles, WORLD):
        assert result["dense"] == {"held": [2, 2], "completed": True, "replaced": True}  # an all-reduce per bucket
        assert result["topk"] == {
            "held": [4, 4],
            "completed": True,
            "replaced": True,
        }  # all-gathers of indices and values
        assert 0 < len(result["run"]) <= 16 and all(result["run"])
        assert result["ddp"] == [2, True]  # the hook's all-gathers (one bucket) are kept


# -- bad input (one process) ------------------------------------------------------------


@pytest.mark.parametrize(
    "build, error, words",
    [
        (lambda: gk.Average(bucket_mb=0), ValueError, "bucket_mb"),
        (lambda: gk.Average(bucket_mb=-1), ValueError, "bucket_mb"),
        (lambda: gk.Average(first_bucket_mb="1"), TypeError, "first_bucket_mb"),
        (lambda: gk.Average(timeout=0), ValueError, "timeout"),
        (lambda: gk.Average(group=object()), ValueError, "not initialized"),
        (lambda: gk.ModelAverager(0), ValueError, "period"),
        (lambda: gk.ModelAverager(2, warmup_steps=-1), ValueError, "warmup_steps"),
        (lambda: gk.ModelAverager(2, group=object()), ValueError, "not initialized"),
    ],
)
def test_bad_averaging_arguments(build, error, words):
    with pytest.raises(error, match=words):
        build()


def test_single_process_average_is_a_group_of_one():
    model, reference = make_model(), make_model()
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=LR), torch.optim.SGD(reference.parameters(), lr=LR)
    pipe = gk.GradientPipeline(model, accumulation_steps=2, average=gk.Average())
    ref_pipe = gk.GradientPipeline(reference, accumulation_steps=2)
    for step in range(4):
        x, y = data(0, step, 5)
        for p, m in ((pipe, model), (ref_pipe, reference)):
            p.backward(sum_loss(m, x, y), num_items=5)
            p.step(opt if p is pipe else ref_opt)
    assert max_diff(model, reference) == 0.0
    assert pipe.last.bytes_sent == 0


@pytest.mark.parametrize(
    "build", [lambda: gk.Average(gk.TopK(0.5)), lambda: gk.ModelAverager(1)], ids=["topk", "local"]
)
def test_a_failed_constructor_leaves_an_averager_another_pipeline_uses_attached(build):
    # A notebook cell that builds the pipeline runs again with the same averager and fails in the tracker's
    # setup: the first pipeline still uses the averager, so it stays attached (a TopK Average still refuses
    # another model, whose gradients would share its residuals).
    model, other, average = make_model(), make_model(seed=1), build()
    pipe = gk.GradientPipeline(model, average=average)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    pipe.backward(sum_loss(model, *data(0, 1, 4)))
    pipe.step(opt)
    with pytest.raises(ValueError, match="log_dir is not writable"):
        gk.GradientPipeline(model, average=average, tracker=RefusingTracker())
    if isinstance(average, gk.Average):
        with pytest.raises(ValueError, match="already attached to a pipeline"):
            gk.GradientPipeline(other, average=average)
    assert average.attached
    pipe.backward(sum_loss(model, *data(0, 2, 4)))
    assert pipe.step(opt)
    # An averager the failed constructor attached itself is detached again.
    fresh = build()
    with pytest.raises(ValueError, match="log_dir is not writable"):
        gk.GradientPipeline(other, average=fresh, tracker=RefusingTracker())
    assert not fresh.attached


def test_average_with_ddp_model_is_refused():
    class FakeDDP(DDP):  # DDP itself needs a process group; the check is a type check
        def __init__(self, module):
            nn.Module.__init__(self)
            self.module = module

    with pytest.raises(ValueError, match="already averages"):
        gk.GradientPipeline(FakeDDP(make_model()), average=gk.Average())


def test_backward_past_the_window_is_refused():
    model = make_model()
    pipe = gk.GradientPipeline(model, accumulation_steps=1)
    x, y = data(0, 0, 3)
    pipe.backward(sum_loss(model, x, y) / 3)
    with pytest.raises(RuntimeError, match="call pipe.step"):
        pipe.backward(sum_loss(model, x, y) / 3)


# -- one process with a compressor: selective updates, error feedback, non-finite steps ------


class _Recording(torch.optim.SGD):
    """SGD that keeps a copy of every gradient it steps with."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return super().step(closure)


def _wide_model(dtype=torch.float32) -> nn.Module:
    # 200x100 weights: above TopK's sampling threshold (its fast path); the bias takes torch.topk.
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(40, 200), nn.Tanh(), nn.Linear(200, 100)).to(dtype)


def _wide_loss(model, step, dtype=torch.float32):
    g = torch.Generator().manual_seed(50 + step)
    x, y = torch.randn(8, 40, generator=g, dtype=dtype), torch.randn(8, 100, generator=g, dtype=dtype)
    return ((model(x) - y) ** 2).sum()


ONE_PROCESS_COMPRESSORS = {
    "topk": lambda: gk.TopK(0.01),
    "topk-exactly-k": lambda: gk.TopK(0.01, exactly_k=True),
    "topk-bf16-residual": lambda: gk.ErrorFeedback(gk.TopK(0.01), residual_dtype=torch.bfloat16),
    "threshold": lambda: gk.Threshold(0.5),
    "dgc": lambda: gk.DGC(0.01),
}


@pytest.mark.parametrize("name", sorted(ONE_PROCESS_COMPRESSORS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_process_nonfinite_at_an_unselected_position_skips_and_keeps_the_state(name, bad):
    # A top-k need not select the bad entry (on a CPU the sampled path never selects NaN), so
    # the sent gradient alone can look finite: the step must still be skipped and the
    # compressor's state (residual, DGC's momentum) stay as it was, as on several processes.
    model = _wide_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe = gk.GradientPipeline(model, accumulation_steps=2, average=gk.Average(ONE_PROCESS_COMPRESSORS[name]()))
    for step in range(3):
        for micro in range(2):
            pipe.backward(_wide_loss(model, 2 * step + micro))
        assert pipe.step(opt)
    before_state = {k: v.clone() for k, v in _flat_state(pipe.state_dict()["average"]).items()}
    before_params = [p.detach().clone() for p in model.parameters()]
    for micro in range(2):
        pipe.backward(_wide_loss(model, 10 + micro))
    weight = model[2].weight.grad
    quiet = weight.abs().argmin()  # the smallest entry: never among the selected ones
    weight.view(-1)[quiet] = bad
    assert not pipe.step(opt)
    assert bool(pipe.last.skipped) and pipe.skipped_steps == 1
    after_state = _flat_state(pipe.state_dict()["average"])
    assert before_state.keys() == after_state.keys() and before_state
    for key, value in before_state.items():
        assert torch.equal(value, after_state[key]), key
    assert all(torch.equal(a, b) for a, b in zip(before_params, model.parameters()))
    # and the next finite step is taken normally
    for micro in range(2):
        pipe.backward(_wide_loss(model, 20 + micro))
    assert pipe.step(opt)


def _flat_state(state, prefix=""):
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update(_flat_state(value, f"{prefix}{key}/"))
        elif isinstance(value, torch.Tensor):
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize("residual_dtype", [None, torch.bfloat16])
def test_one_process_error_feedback_sends_what_it_does_not_keep(residual_dtype):
    # Over the steps, what reached the optimizer plus the final residual is the sum of the
    # window-mean gradients (float64: exact up to rounding), and only ~1% of entries move.
    model = _wide_model(torch.float64)
    opt = _Recording(model.parameters(), lr=0.0)  # lr 0: the same gradients every step
    average = gk.Average(gk.ErrorFeedback(gk.TopK(0.01), residual_dtype=residual_dtype))
    pipe = gk.GradientPipeline(model, accumulation_steps=2, average=average)
    total = [torch.zeros_like(p) for p in model.parameters()]
    for step in range(4):
        for micro in range(2):
            loss = _wide_loss(model, 2 * step + micro, torch.float64)
            for t, g in zip(total, torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)):
                t += g / 2
            pipe.backward(loss)
        assert pipe.step(opt)
    residuals = pipe.state_dict()["average"]["compressor"]["residuals"]
    names = [name for name, _ in model.named_parameters()]
    for position, (name, t) in enumerate(zip(names, total)):
        sent = sum(seen[position] for seen in opt.seen)
        kept = residuals[name].to(torch.float64)
        tolerance = 1e-12 if residual_dtype is None else 2e-2 * t.abs().max().item()
        torch.testing.assert_close(sent + kept.view_as(t), t, rtol=0, atol=tolerance)
    weight_sent = opt.seen[0][names.index("2.weight")]
    assert 0 < int((weight_sent != 0).sum()) <= int(0.015 * weight_sent.numel()) + 1
