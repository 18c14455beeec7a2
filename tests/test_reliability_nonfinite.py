"""A NaN/inf gradient on one rank only: every rank skips the same step, and on every rank the
optimizer state, clip history (ZClip, AutoClip) and error-feedback residuals stay as they
were; with a GradScaler the inf decision and the scale update agree across ranks.
(The plain dense and TopK skips are in test_averaging.py / test_compression_dist.py.)"""

from __future__ import annotations

import pytest
import torch

import gradkit as gk
from dist_helpers import run_workers
from reliability_helpers import data, differences, items_at, loss_of, make_model, params_of, snapshot

WINDOWS = 5
BAD_WINDOW = 2  # 0-based: the third optimizer step
ACCUMULATION = 2
# fused-*: a fused optimizer with a stateless clip, so the skip is decided on the device (no host read)
# *-powersgd: the flag rides in PowerSGD's first factor, with no all-reduce of its own
MODES = (
    "dense",
    "topk",
    "powersgd",
    "scaler-dense",
    "scaler-topk",
    "scaler-powersgd",
    "fused-dense",
    "fused-scaler-dense",
)
COMPRESSORS = {"topk": lambda: gk.TopK(0.05), "powersgd": lambda: gk.PowerSGD(2)}


def build(mode: str):
    scaled, fused = "scaler" in mode, mode.startswith("fused")
    model = make_model(dtype=torch.float32 if scaled else torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused or None)
    stateful = [gk.ZClip(warmup=1, z_thresh=0.5), gk.AutoClip(percentile=50, history=4)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) if scaled else None
    pipe = gk.GradientPipeline(
        model,
        accumulation_steps=ACCUMULATION,
        average=gk.Average(COMPRESSORS.get(mode.split("-")[-1], lambda: None)()),
        clip=[gk.ClipByGlobalNorm(1.0)] if fused else stateful,
        scaler=scaler,
    )
    return model, opt, pipe


def skip_on_one_rank(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    results = {}
    for mode in MODES:
        model, opt, pipe = build(mode)
        dtype = next(model.parameters()).dtype
        stepped, scales, skipped_flags = [], [], []
        for window in range(WINDOWS):
            for k in range(ACCUMULATION):
                micro = ACCUMULATION * window + k
                x, y = data(rank, micro, dtype)
                loss = loss_of(model, x, y)
                # Rank 1 only, on the window's first micro-step: the bad value must survive
                # accumulation and reach the other rank through the averaging.
                if window == BAD_WINDOW and k == 0 and rank == 1:
                    loss = loss * (float("inf") if "scaler" in mode else float("nan"))
                if window == BAD_WINDOW and k == ACCUMULATION - 1:
                    before = snapshot((model, opt, pipe))
                pipe.backward(loss, num_items=items_at(rank, micro))
                stepped.append(pipe.step(opt))
            skipped_flags.append(bool(pipe.last.skipped))
            if pipe.scaler is not None:
                scales.append(pipe.scaler.get_scale())
            if window == BAD_WINDOW:
                after = snapshot((model, opt, pipe))
                results[f"{mode}/untouched"] = {
                    "params": differences(before["params"], after["params"], "params"),
                    "optimizer": differences(before["opt"], after["opt"], "optimizer"),
                    "clip": differences(before["pipe"]["clip"], after["pipe"]["clip"], "clip"),
                    "residuals": differences(before["pipe"]["average"], after["pipe"]["average"], "average"),
                }
                results[f"{mode}/opt_has_state"] = bool(before["opt"]["state"])
                results[f"{mode}/clip_counts"] = [s.get("count") for s in after["pipe"]["clip"]]
        results[f"{mode}/stepped"] = stepped
        results[f"{mode}/skipped_flags"] = skipped_flags
        results[f"{mode}/skipped_steps"] = pipe.skipped_steps
        results[f"{mode}/scales"] = scales
        results[f"{mode}/params"] = params_of(model)
        results[f"{mode}/residual_names"] = sorted(
            pipe.state_dict()["average"].get("compressor", {}).get("residuals", {})
        )
        pipe.sync.detach()
    return results


@pytest.fixture(scope="module")
def outcome():
    return run_workers(skip_on_one_rank, 2, timeout=180)


@pytest.mark.parametrize("mode", MODES)
def test_every_rank_skips_the_same_step_and_stays_identical(outcome, mode):
    # Skipping on the device, step() says the optimizer was called (it skipped on its own).
    on_device = mode.startswith("fused")
    expected = [
        k == ACCUMULATION - 1 and (w != BAD_WINDOW or on_device) for w in range(WINDOWS) for k in range(ACCUMULATION)
    ]
    for rank in outcome:
        assert rank[f"{mode}/stepped"] == expected
        assert rank[f"{mode}/skipped_flags"] == [w == BAD_WINDOW for w in range(WINDOWS)]
        assert rank[f"{mode}/skipped_steps"] == 1
    for a, b in zip(outcome[0][f"{mode}/params"], outcome[1][f"{mode}/params"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_skip_leaves_optimizer_clip_history_and_residuals_untouched_on_every_rank(outcome, mode):
    for rank in outcome:
        assert rank[f"{mode}/opt_has_state"]  # Adam had moments and a step count to protect
        assert rank[f"{mode}/untouched"] == {"params": [], "optimizer": [], "clip": [], "residuals": []}
        if not mode.startswith("fused"):  # ClipByGlobalNorm has no history
            assert rank[f"{mode}/clip_counts"] == [BAD_WINDOW, BAD_WINDOW]  # the bad step never entered
    if mode.endswith(("topk", "powersgd")):
        assert outcome[0][f"{mode}/residual_names"]  # there were residuals to protect


@pytest.mark.parametrize("mode", ["scaler-dense", "scaler-topk", "scaler-powersgd"])
def test_grad_scaler_inf_decision_and_scale_updates_agree_across_ranks(outcome, mode):
    scales0, scales1 = outcome[0][f"{mode}/scales"], outcome[1][f"{mode}/scales"]
    assert scales0 == scales1
    # growth_interval=2: grows after windows 0-1, backs off (x0.5) at the inf, grows after 3-4.
    assert scales0 == [2.0**10, 2.0**11, 2.0**10, 2.0**10, 2.0**11]
