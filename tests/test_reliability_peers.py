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


def stuck_peer(rank: int, world: int, compressed: bool, item_mode: bool, report_path: str) -> None:
    torch.set_num_threads(1)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    average = gk.Average(gk.TopK(0.1) if compressed else None, timeout=TIMEOUT)
    pipe = gk.GradientPipeline(model, average=average)
    for step in range(4):
        x, y = data(rank, step, 4)
        if rank == 1 and step == 2:
            # Alive but never joining: wait (bounded) until the survivor has reported, then go.
            deadline = time.monotonic() + 60
            while not os.path.exists(report_path) and time.monotonic() < deadline:
                time.sleep(0.1)
            os._exit(0)
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
