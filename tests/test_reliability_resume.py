"""Exact resume: N micro-steps straight equal k + save + load into fresh objects + N - k,
bit for bit, on one process and on two gloo processes, with every kind of pipeline state
(error-feedback residuals, DGC momentum/velocity, PowerSGD factors, RandomK/QSGD draws,
AutoClip history, ZClip EMAs, GradScaler, tracker counters, a partial window's gradients)."""

from __future__ import annotations

import os

import pytest
import torch

from dist_helpers import run_workers
from reliability_helpers import (
    build,
    checkpoint,
    differences,
    items_at,
    one_thread,
    params_of,
    restore,
    save_atomically,
    train,
)

single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

STEPS = 8  # micro-steps: 4 optimizer steps of 2 micro-steps
CUTS = (4, 5)  # at a window boundary, and in the middle of a window
CONFIGS = ("dense", "topk", "dgc", "powersgd", "randomk", "qsgd", "scaler")


def straight_and_resumed(config: str, cut: int, rank: int = 0, *, tracker: bool, folder: str | None = None):
    """Final (objects, objects) of the straight run and of the run checkpointed at `cut`."""
    straight = build(config, tracker=tracker)
    train(straight, rank, 0, STEPS)
    first = build(config, tracker=tracker)
    train(first, rank, 0, cut)
    ckpt = checkpoint(first)
    if folder is not None:  # on disk too, per rank, as a distributed job would
        path = os.path.join(folder, f"{config}-{cut}-rank{rank}.pt")
        save_atomically(ckpt, path)
        ckpt = torch.load(path, weights_only=True)
    del first
    torch.manual_seed(12345)  # whatever the RNG did in between, the checkpoint's state wins
    resumed = build(config, tracker=tracker)
    restore(resumed, ckpt)
    train(resumed, rank, cut, STEPS)
    return straight, resumed


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("config", CONFIGS)
def test_resume_in_one_process_is_bit_identical(config, cut):
    straight, resumed = straight_and_resumed(config, cut, tracker=True)
    for a, b in zip(params_of(straight[0]), params_of(resumed[0])):
        assert torch.equal(a, b)
    assert differences(straight[1].state_dict(), resumed[1].state_dict(), "optimizer") == []
    assert differences(straight[2].state_dict(), resumed[2].state_dict(), "pipeline") == []
    assert resumed[2].steps == STEPS // 2


def test_pipeline_state_holds_every_stateful_part():
    model, opt, pipe = build("topk", tracker=True)
    train((model, opt, pipe), 0, 0, 3)  # one step done, one micro-step pending
    state = checkpoint((model, opt, pipe))["pipe"]  # loads with weights_only=True
    assert state["micro_steps"] == 1 and state["items"] == items_at(0, 2) and state["steps"] == 1
    assert sorted(state["grads"]) == sorted(name for name, _ in model.named_parameters())
    residuals = state["average"]["compressor"]["residuals"]
    assert sorted(residuals) == sorted(state["grads"])  # keyed by parameter name
    assert state["clip"][0]["count"] == 1 and state["clip"][1]["count"] == 1  # ZClip, AutoClip
    assert state["tracker"]["step"] == 1
    states = {}
    for config in ("dgc", "powersgd", "randomk", "qsgd"):
        objects = build(config)
        train(objects, 0, 0, 2)
        states[config] = objects[2].state_dict()["average"]["compressor"]
    assert set(states["dgc"]) == {"momentum", "velocity", "steps"}
    assert sorted(states["dgc"]["velocity"]) == sorted(state["grads"])
    assert set(states["powersgd"]["q"]) == {"0.weight", "2.weight", "4.weight"}  # the matrices (biases go dense)
    assert states["randomk"]["step"] == 6  # one draw per parameter
    assert states["qsgd"]["generator"].dtype == torch.uint8


def test_resume_without_the_residuals_differs():
    """The check can fail: dropping one piece of state (the residuals) changes the result."""
    straight = build("topk")
    train(straight, 0, 0, STEPS)
    first = build("topk")
    train(first, 0, 0, 4)
    ckpt = checkpoint(first)
    ckpt["pipe"]["average"]["compressor"]["residuals"] = {}
    resumed = build("topk")
    restore(resumed, ckpt)
    train(resumed, 0, 4, STEPS)
    assert not all(torch.equal(a, b) for a, b in zip(params_of(straight[0]), params_of(resumed[0])))


# -- two processes ------------------------------------------------------------------------

DIST_CASES = (("topk", 4), ("topk", 5), ("dgc", 5), ("powersgd", 4), ("dense", 5), ("scaler", 5))


def resume_on_ranks(rank: int, world: int, folder: str) -> dict:
    results = {}
    for config, cut in DIST_CASES:
        straight, resumed = straight_and_resumed(config, cut, rank, tracker=False, folder=folder)
        results[(config, cut)] = {
            "straight": params_of(straight[0]),
            "resumed": params_of(resumed[0]),
            "pipe_differences": differences(straight[2].state_dict(), resumed[2].state_dict(), "pipeline"),
            "opt_differences": differences(straight[1].state_dict(), resumed[1].state_dict(), "optimizer"),
        }
        for objects in (straight, resumed):
            objects[2].sync.detach()  # the next case builds new pipelines: drop this one's hooks
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_workers(resume_on_ranks, 2, str(tmp_path_factory.mktemp("resume")), timeout=240)


@pytest.mark.parametrize("case", DIST_CASES, ids=[f"{c}-cut{k}" for c, k in DIST_CASES])
def test_resume_on_two_ranks_is_bit_identical(two_ranks, case):
    for rank in two_ranks:
        result = rank[case]
        for a, b in zip(result["straight"], result["resumed"]):
            assert torch.equal(a, b)
        assert result["pipe_differences"] == []
        assert result["opt_differences"] == []
    for a, b in zip(two_ranks[0][case]["resumed"], two_ranks[1][case]["resumed"]):
        assert torch.equal(a, b)  # and the replicas agree
