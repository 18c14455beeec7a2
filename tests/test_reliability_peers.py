"""A stuck peer (alive, never joining the collective): the survivor raises
gk.CollectiveError naming the operation within the configured timeout; nothing hangs.
(A peer that dies is tests/test_averaging.py::test_dead_peer_is_a_clear_error_within_the_timeout.)"""

from __future__ import annotations

import os
import time

import pytest
import torch

import gradkit as gk
from dist_helpers import WorkerError, run_workers
from test_averaging import LR, data, make_model, sum_loss

TIMEOUT = 3.0  # gk.Average(timeout=...)
MARGIN = 20.0  # generous: spawn, gloo and a busy machine


def leave_after(report_path: str) -> None:
    """Rank 1 alive but never joining: wait (bounded) until the survivor has reported, then go."""
    deadline = time.monotonic() + 60
    while not os.path.exists(report_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    os._exit(0)


def stuck_peer(rank: int, world: int, compressed: bool, item_mode: bool, report_path: str) -> None:
    torch.set_num_threads(1)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    average = gk.Average(gk.TopK(0.1) if compressed else None, timeout=TIMEOUT)
    pipe = gk.GradientPipeline(model, average=average)
    for step in range(4):
        x, y = data(rank, step, 4)
        if rank == 1 and step == 2:
            leave_after(report_path)
        started = time.monotonic()
        try:
            if item_mode:
                pipe.backward(sum_loss(model, x, y), num_items=4)
            else:
                pipe.backward(sum_loss(model, x, y) / 4)
            pipe.step(opt)
        except gk.CollectiveError as error:
            report = {"seconds": time.monotonic() - started, "message": str(error), "step": step}
            partial = report_path + ".partial"
            torch.save(report, partial)
            os.replace(partial, report_path)
            raise


@pytest.mark.parametrize(
    "compressed, item_mode, operation",
    [
        # Mean mode sums the window's micro-step count over ranks before the boundary
        # backward (as item mode sums its items): that is the first wait in both paths.
        (False, False, "all-reduce of the item count"),
        (True, False, "all-reduce of the item count"),
    ],
    ids=["dense", "topk"],
)
def test_stuck_peer_is_a_clear_error_within_the_timeout(tmp_path, compressed, item_mode, operation):
    report_path = str(tmp_path / "survivor.pt")
    started = time.monotonic()
    with pytest.raises(WorkerError) as failure:
        run_workers(stuck_peer, 2, compressed, item_mode, report_path, timeout=120, pg_timeout=60)
    assert time.monotonic() - started < 120  # nothing hung: run_workers returned with an error
    report = torch.load(report_path, weights_only=True)
    assert report["step"] == 2
    # It waited for the configured timeout (not the process group's 60 s) and no longer.
    assert TIMEOUT * 0.8 <= report["seconds"] < TIMEOUT + MARGIN
    assert "gk.Average" in report["message"] and operation in report["message"], report["message"]
    assert "peer" in report["message"]
    assert "CollectiveError" in str(failure.value)


# -- the other averaging paths, and setup ---------------------------------------------------
# Each case: (what the survivor builds, whether rank 1 leaves before setup, the words its error names).
PATHS = {
    # Setup's check that the ranks hold the same model waited the process group's timeout, unnamed.
    "setup": ("average", True, "gk.Average: all-gather of the parameter names"),
    "setup-local-sgd": ("local_sgd", True, "gk.ModelAverager: all-gather of the parameter names"),
    # node_size builds its groups at setup; a peer that never does so was an unnamed "Wait timeout".
    "setup-hierarchical": ("hierarchical", True, "gk.Average(node_size=2): creating the node and cross-node"),
    "local-sgd": ("local_sgd", False, "gk.ModelAverager: all-reduce of parameters"),
    "hierarchical-topk": ("hierarchical", False, "gk.Average: sum in the node of bucket 0"),
}


def _pipeline_for(kind: str, model: torch.nn.Module) -> gk.GradientPipeline:
    if kind == "local_sgd":
        return gk.GradientPipeline(model, average=gk.ModelAverager(1, timeout=TIMEOUT))
    # One node of two: both hops run (the sum in the node, the compressed hop between nodes). Even
    # windows in mean mode need no count all-reduce, so the bucket's own collective is the first wait.
    average = gk.Average(gk.TopK(0.1), node_size=2, timeout=TIMEOUT, even_windows=True)
    return gk.GradientPipeline(model, average=average if kind == "hierarchical" else gk.Average(timeout=TIMEOUT))


def steps_until_stuck(rank: int, make_pipeline, report_path: str, *, at_setup: bool = False) -> None:
    """Three steps, rank 1 leaving at step 2 (or before it builds its pipeline, `at_setup`); the survivor saves
    its `gk.CollectiveError` with how long the failing call waited and at which step."""
    torch.set_num_threads(1)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    started, step = time.monotonic(), None
    try:
        if rank == 1 and at_setup:
            leave_after(report_path)
        pipe = make_pipeline(model)
        for step in range(3):
            if rank == 1 and step == 2:
                leave_after(report_path)
            x, y = data(rank, step, 4)
            started = time.monotonic()
            pipe.backward(sum_loss(model, x, y) / 4)
            pipe.step(opt)
    except gk.CollectiveError as error:
        report = {"seconds": time.monotonic() - started, "message": str(error), "step": step}
        torch.save(report, report_path + ".partial")
        os.replace(report_path + ".partial", report_path)
        raise


def stuck_in_path(rank: int, world: int, kind: str, at_setup: bool, report_path: str) -> None:
    steps_until_stuck(rank, lambda model: _pipeline_for(kind, model), report_path, at_setup=at_setup)


@pytest.mark.parametrize("case", list(PATHS))
def test_stuck_peer_in_every_averaging_path_is_a_clear_error_within_the_timeout(tmp_path, case):
    kind, at_setup, words = PATHS[case]
    report_path = str(tmp_path / "survivor.pt")
    with pytest.raises(WorkerError) as failure:
        run_workers(stuck_in_path, 2, kind, at_setup, report_path, timeout=90, pg_timeout=60)
    report = torch.load(report_path, weights_only=True)
    # The configured 3 s, not the process group's 60 s.
    assert TIMEOUT * 0.8 <= report["seconds"] < TIMEOUT + MARGIN, report
    assert words in report["message"], report["message"]
    assert "CollectiveError" in str(failure.value)


# -- the tracker's gather --------------------------------------------------------------------------


def _gathering(model: torch.nn.Module) -> gk.GradientPipeline:
    """Tracker(gather=True) without averaging: the logged step's all-gather is the only collective."""
    return gk.GradientPipeline(model, tracker=gk.Tracker(every=1, gather=True, timeout=TIMEOUT))


def stuck_in_gather(rank: int, world: int, report_path: str) -> None:
    steps_until_stuck(rank, _gathering, report_path)


def test_stuck_peer_in_the_trackers_gather_is_a_clear_error_within_its_timeout(tmp_path):
    report_path = str(tmp_path / "survivor.pt")
    with pytest.raises(WorkerError) as failure:
        run_workers(stuck_in_gather, 2, report_path, timeout=90, pg_timeout=60)
    report = torch.load(report_path, weights_only=True)
    # The tracker's 3 s, not the process group's 60 s; steps 0 and 1 gathered.
    assert report["step"] == 2 and TIMEOUT * 0.8 <= report["seconds"] < TIMEOUT + MARGIN, report
    assert "Tracker(gather=True): all_gather" in report["message"] and "peer" in report["message"], report
    assert "CollectiveError" in str(failure.value)
