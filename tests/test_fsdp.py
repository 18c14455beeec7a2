"""FSDP2 (fully_shard) through the pipeline, on 2 and 4 real gloo processes, float64.

Every check compares against one unsharded model trained on the concatenation of
every rank's every micro-batch (the mean over all items). Starting process groups
is slow, so one spawned group per world size runs all the checks and returns
what the parent asserts.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import gradkit as gk
from dist_helpers import run_workers

STEPS, ACCUM, LR = 3, 3, 0.1
TOL = 1e-10


def _model(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    # Odd sizes: the shards are uneven across 2 and 4 ranks (one rank may hold nothing of a bias).
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _shard(model: nn.Module, mesh=None, mp=None) -> nn.Module:
    kwargs = {"mesh": mesh} if mesh is not None else {}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _data(world: int, steps: int, accum: int, dtype=torch.float64):
    """data[step][micro][rank] = (x, y), with uneven item counts per rank and micro-batch (the same on every rank)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        window = []
        for _ in range(accum):
            row = []
            for _ in range(world):
                n = int(torch.randint(1, 6, (1,), generator=g))
                row.append((torch.randn(n, 6, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)))
            window.append(row)
        out.append(window)
    return out


def _loss(model, x, y):
    return ((model(x) - y) ** 2).sum()


def _reference(data, clip):
    """The unsharded run: one mean-loss step per window over every rank's every micro-batch.

    Returns the parameters after each step, and per step the global and per-parameter gradient norms, the weight
    norms and the update-to-weight ratios ||Δw|| / ||w||."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    norms = []
    for window in data:
        xs = torch.cat([x for row in window for x, _ in row])
        ys = torch.cat([y for row in window for _, y in row])
        opt.zero_grad()
        (_loss(model, xs, ys) / len(xs)).backward()
        per = {n: p.grad.norm() for n, p in model.named_parameters()}
        weights = {n: float(p.detach().norm()) for n, p in model.named_parameters()}
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        if clip == "global":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        elif clip == "layer":
            for p in model.parameters():
                torch.nn.utils.clip_grad_norm_([p], 0.3)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        ratios = {n: float((p.detach() - before[n]).norm() / before[n].norm()) for n, p in model.named_parameters()}
        norms.append((total, per, weights, ratios))
    return model, norms


def _stage(clip):
    return {"global": gk.ClipByGlobalNorm(0.5), "layer": gk.ClipPerLayer(0.3), None: None}[clip]


def _full(model):
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _train(
    rank, data, *, reduce="every", clip=None, mesh=None, tracker=None, mp=None, flush_last=False, dtype=torch.float64
):
    model = _shard(_model(dtype), mesh, mp)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    sync = gk.FSDPSync(model, reduce=reduce)
    pipe = gk.GradientPipeline(model, accumulation_steps=ACCUM, average=sync, clip=_stage(clip), tracker=tracker)
    dp_rank = rank if mesh is None else mesh.get_local_rank(0) * mesh.size(1) + mesh.get_local_rank(1)
    norms = []
    for s, window in enumerate(data):
        window = window[:-1] if flush_last and s == len(data) - 1 else window
        for row in window:
            x, y = (t.to(dtype) for t in row[dp_rank])
            pipe.backward(_loss(model, x, y), num_items=len(x))
            pipe.step(opt)
        if len(window) < ACCUM:
            assert pipe.flush(opt)
        norms.append(pipe.last.total_norm)
    return model, norms, pipe


def _close(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _checks(rank: int, world: int) -> dict:
    out = {}
    data = _data(world, STEPS, ACCUM)
    # Exactness: both modes, global and per-layer clipping (and a flushed last window), plus the tracker.
    for reduce in ("every", "boundary"):
        for clip in (None, "global", "layer"):
            flush = clip == "layer"
            tracker = gk.Tracker(None, every=1, detail_every=1) if clip == "global" else None
            model, norms, _ = _train(rank, data, reduce=reduce, clip=clip, tracker=tracker, flush_last=flush)
            # A flushed last window holds its first ACCUM - 1 micro-batches.
            ref, ref_norms = _reference(data[:-1] + [data[-1][:-1]] if flush else data, clip)
            key = f"{reduce}/{clip}"
            out[key] = _close(_full(model), dict(ref.named_parameters()))
            out[key + "/norm"] = max(abs(float(n) - float(r[0])) for n, r in zip(norms, ref_norms))
            out[key + "/norm_plain"] = all(type(n) is torch.Tensor for n in norms)
            if tracker is not None and rank == 0:
                diffs = []
                for record, (total, per, _, _) in zip(tracker.history, ref_norms):
                    diffs.append(abs(record["global"]["norm_pre_clip"] - float(total)))
                    diffs += [abs(record["params"][n]["norm_pre_clip"] - float(v)) for n, v in per.items()]
                out[key + "/tracker"] = (len(tracker.history), max(diffs))
                last = tracker.history[-1]["params"]
                out[key + "/tracker_weight"] = max(abs(last[n]["weight_norm"] - w) for n, w in ref_norms[-1][2].items())
                # ||Δw|| of the full weights, from the shards' (one reduce of the squares): FSDP's uneven shards.
                out[key + "/update_ratio"] = max(
                    abs(last[n]["update_to_weight"] - r) for n, r in ref_norms[-1][3].items()
                )
    # Mid-window resume, bit-identical, from per-rank files loaded with weights_only=True.
    for reduce in ("every", "boundary"):
        out[f"resume/{reduce}"] = _resume(rank, data, reduce)
    # Compression needs replicated gradients.
    try:
        gk.GradientPipeline(_shard(_model()), average=gk.Average(gk.TopK(0.5)))
        out["compression_error"] = None
    except ValueError as error:
        out["compression_error"] = str(error)
    # A NaN on one rank: every rank skips, and the parameters stay.
    model = _shard(_model())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tracker = gk.Tracker(None, every=1)
    pipe = gk.GradientPipeline(model, tracker=tracker)
    before = _full(model)
    x, y = data[0][0][rank]
    loss = _loss(model, x, y) * (math.nan if rank == world - 1 else 1.0)
    pipe.backward(loss, num_items=len(x))
    out["nan_stepped"] = pipe.step(opt)
    out["nan_unchanged"] = _close(_full(model), before) == 0.0
    out["nan_alerts"] = [(a.kind, a.name) for a in tracker.last_alerts]
    # Mixed precision: bf16 parameters in compute, float32 reduction.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for reduce in ("every", "boundary"):
        model, norms, _ = _train(rank, data, reduce=reduce, mp=mp, dtype=torch.float32)
        ref, _ = _reference(data, None)
        out[f"mp/{reduce}"] = (
            _close({n: t.double() for n, t in _full(model).items()}, dict(ref.named_parameters())),
            all(map(torch.isfinite, norms)),
        )
    # gk.clip_grad_norm_ on DTensor gradients: torch's semantics, a plain tensor back.
    model = _shard(_model())
    x, y = data[0][0][rank]
    _loss(model, x, y).backward()
    twin = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
    per = gk.grad_norms(model.parameters())
    out["grad_norms"] = (
        type(per) is torch.Tensor,
        float((per - torch.stack([g.norm() for g in twin.values()])).abs().max()),
    )
    total = gk.clip_grad_norm_(model.parameters(), 0.01)
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in twin.values()]))
    out["clip_fn"] = (type(total) is torch.Tensor, abs(float(total) - float(expected)))
    coef = min(1.0, 0.01 / (float(expected) + 1e-6))
    out["clip_fn_grads"] = _close(
        {n: p.grad.full_tensor() for n, p in model.named_parameters()}, {n: g * coef for n, g in twin.items()}
    )
    if world == 4:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for reduce in ("every", "boundary"):
            model, norms, _ = _train(rank, data, reduce=reduce, clip="global", mesh=mesh)
            ref, ref_norms = _reference(data, "global")
            out[f"hsdp/{reduce}"] = (
                _close(_full(model), dict(ref.named_parameters())),
                max(abs(float(n) - float(r[0])) for n, r in zip(norms, ref_norms)),
            )
    return out


def _resume(rank: int, data, reduce: str) -> bool:
    def build():
        model = _shard(_model())
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        pipe = gk.GradientPipeline(
            model, accumulation_steps=ACCUM, average=gk.FSDPSync(model, reduce=reduce), clip=gk.ClipByGlobalNorm(0.5)
        )
        return model, opt, pipe

    def feed(model, opt, pipe, micro_batches):
        for row in micro_batches:
            x, y = row[rank]
            pipe.backward(_loss(model, x, y), num_items=len(x))
            pipe.step(opt)

    flat = [row for window in data for row in window]
    cut = ACCUM + 1  # mid-window: one micro-batch into the second window
    model, opt, pipe = build()
    feed(model, opt, pipe, flat[:cut])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pipe": pipe.state_dict()}, buffer)
    feed(model, opt, pipe, flat[cut:])
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    model2, opt2, pipe2 = build()
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    pipe2.load_state_dict(state["pipe"])
    feed(model2, opt2, pipe2, flat[cut:])
    a, b = _full(model), _full(model2)
    return all(torch.equal(a[n], b[n]) for n in a)


@pytest.fixture(scope="module", params=[2, 4])
def results(request):
    return run_workers(_checks, request.param, timeout=300.0, pg_timeout=120.0), request.param


def test_parameters_match_the_unsharded_run_in_both_modes_with_and_without_clipping(results):
    out, world = results
    for rank, ranks_out in enumerate(out):
        for reduce in ("every", "boundary"):
            for clip in (None, "global", "layer"):
                key = f"{reduce}/{clip}"
                assert ranks_out[key] < TOL, (world, rank, key, ranks_out[key])


def test_total_norm_is_the_unsharded_norm_as_a_plain_tensor_on_every_rank(results):
    out, _ = results
    for ranks_out in out:
        for reduce in ("every", "boundary"):
            for clip in (None, "global", "layer"):
                assert ranks_out[f"{reduce}/{clip}/norm"] < TOL
                assert ranks_out[f"{reduce}/{clip}/norm_plain"]


def test_tracker_logs_the_unsharded_norms_once_on_rank_zero(results):
    out, _ = results
    for reduce in ("every", "boundary"):
        logged, diff = out[0][f"{reduce}/global/tracker"]
        assert logged == STEPS and diff < TOL
        assert out[0][f"{reduce}/global/tracker_weight"] < TOL  # ||w|| of the full weights
        assert out[0][f"{reduce}/global/update_ratio"] < TOL
        assert all(f"{reduce}/global/tracker" not in r for r in out[1:])  # only rank 0 records


def test_resume_mid_window_is_bit_identical(results):
    out, _ = results
    assert all(r["resume/every"] and r["resume/boundary"] for r in out)


def test_compression_needs_replicated_gradients(results):
    out, _ = results
    for r in out:
        assert r["compression_error"] is not None and "replicated gradients" in r["compression_error"]


def test_a_nan_on_one_rank_makes_every_rank_skip_and_the_alert_names_the_layer(results):
    out, _ = results
    assert all(r["nan_stepped"] is False and r["nan_unchanged"] for r in out)
    assert ("nonfinite", "4") in out[0]["nan_alerts"]  # the last Linear: first in backward order


def test_mixed_precision_runs(results):
    out, _ = results
    for r in out:
        for reduce in ("every", "boundary"):
            diff, finite = r[f"mp/{reduce}"]
            assert finite and diff < 1e-2  # bf16 compute: close to the float64 run, not equal


def test_functional_clipping_and_norms_on_dtensor_gradients(results):
    out, _ = results
    for r in out:
        plain, diff = r["clip_fn"]
        assert plain and diff < TOL
        assert r["clip_fn_grads"] < TOL
        plain, diff = r["grad_norms"]
        assert plain and diff < TOL


def test_hsdp_two_by_two_mesh(results):
    out, world = results
    if world != 4:
        pytest.skip("HSDP 2x2 needs 4 processes")
    for r in out:
        for reduce in ("every", "boundary"):
            params, norm = r[f"hsdp/{reduce}"]
            assert params < TOL and norm < TOL


def test_fsdp_sync_rejects_bad_arguments():
    with pytest.raises(TypeError, match="fully_shard"):
        gk.FSDPSync(nn.Linear(2, 2))
