"""Background writing of the tracker's records (`Tracker(background=True)`) against writing them inline."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import types
import weakref

import pytest
import torch
from torch import nn

import gradkit as gk
from gradkit.tracking import record as record_module
from gradkit.tracking import sink as sink_module
from gradkit.tracking import writer_thread
from gradkit.tracking.alerts import AlertRules
from gradkit.tracking.writer_thread import WriterThread
from gradkit.tracking.writers import read_jsonl


class LateEvent:
    """An event that completes only at a later step (a GPU's copy still running), or when waited on."""

    def __init__(self, log):
        self.complete = False
        log.append(self)

    def query(self):
        return self.complete

    def synchronize(self):
        self.complete = True


class Net(nn.Module):
    """Two layers that learn and one whose gradient is exactly zero (a dead-layer alert, from a quiet record)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))
        self.gate = nn.Linear(6, 2)

    def forward(self, x):
        return self.body(x) + 0.0 * self.gate(x)


def train(tracker, steps, *, nan_at=None, big_at=None, late=False):
    """A pipeline run; `late`: each record's copy completes only at the next step."""
    torch.manual_seed(0)
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    events = []
    if late:
        tracker._new_event = lambda device: LateEvent(events)
    pipe = gk.GradientPipeline(model, clip=gk.ClipByGlobalNorm(0.5), tracker=tracker)
    g = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        x, y = torch.randn(8, 6, generator=g).double(), torch.randn(8, 2, generator=g).double()
        loss = ((model(x) - y) ** 2).sum()
        if step == nan_at:
            loss = loss * float("nan")
        if step == big_at:
            loss = loss * 1e4
        pipe.backward(loss, num_items=8)
        pipe.step(opt)
        for event in events:
            event.complete = True


@pytest.fixture
def fixed_time(monkeypatch):
    """Records carry the time they were assembled: fixed, so that two runs' files can be compared byte for byte."""
    clock = types.SimpleNamespace(time=lambda: 1700000000.5)
    monkeypatch.setattr(record_module, "time", clock)
    monkeypatch.setattr(sink_module, "time", clock)


def spy_writes(tracker):
    """(step, thread name) of every record the sink writes."""
    sink, seen = tracker._sink, []
    write = sink.write

    def spying(logged, **kwargs):
        seen.append((logged.step, threading.current_thread().name))
        write(logged, **kwargs)

    sink.write = spying
    return seen


def test_background_must_be_a_flag_or_none():
    with pytest.raises(TypeError, match=r"background must be True, False or None, got str 'yes'; pass None"):
        gk.Tracker(background="yes")
    with pytest.raises(TypeError, match="got int 1"):
        gk.Tracker(background=1)


def test_by_default_a_cpu_model_writes_on_the_training_thread():
    tracker = gk.Tracker(every=1)
    seen = spy_writes(tracker)
    train(tracker, 3)
    tracker.close()
    assert tracker.background is None and not tracker._threaded
    assert [name for _, name in seen] == [threading.current_thread().name] * 3


@pytest.mark.parametrize("late", [False, True])
def test_background_records_equal_the_inline_ones_byte_for_byte(tmp_path, fixed_time, caplog, late):
    # Alerts from quiet records (dead, exploding) are decided on the thread; the non-finite step, its
    # re-check and the steps around them stay on the training thread: every output must be the same.
    runs = {}
    for background in (False, True):
        caplog.clear()
        log_dir = tmp_path / str(background)
        rules = AlertRules(warmup=2, patience=2)
        tracker = gk.Tracker(log_dir, every=1, detail_every=3, alerts=rules, background=background)
        seen = spy_writes(tracker)
        with caplog.at_level(logging.INFO, logger="gradkit.tracking"):
            train(tracker, 14, nan_at=6, big_at=11, late=late)
            tracker.flush()
        state = tracker.state_dict()
        tracker.close()
        runs[background] = {
            "text": (log_dir / "tracking.jsonl").read_bytes(),
            "history": tracker.history,
            "alerts": [a.to_dict() for a in tracker.alerts],
            "last_alerts": tracker.last_alerts,
            "log": [(r.levelname, r.getMessage()) for r in caplog.records],
            "state": state,
            "seen": seen,
        }
    inline, threaded = runs[False], runs[True]
    assert threaded["text"] == inline["text"]
    assert threaded["history"] == inline["history"] == [r for r in read_jsonl(tmp_path / "True" / "tracking.jsonl")][1:]
    assert [r["step"] for r in threaded["history"]] == list(range(1, 15))
    assert threaded["alerts"] == inline["alerts"] and threaded["last_alerts"] == inline["last_alerts"]
    kinds = {a["kind"] for a in inline["alerts"]}
    assert {"dead", "exploding", "nonfinite"} <= kinds  # every path was exercised
    assert threaded["log"] == inline["log"] and any(level == "WARNING" for level, _ in inline["log"])
    assert threaded["state"].keys() == inline["state"].keys()
    for key, value in inline["state"].items():
        other = threaded["state"][key]
        assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value, key
    # Where each record was written: the non-finite step and its re-check here, most others on the thread.
    main = threading.current_thread().name
    where = dict(threaded["seen"])
    assert sorted(where) == list(range(1, 15))
    rechecked = 8 if late else 7  # the first step whose backward had not run when step 6's record was read
    assert f"re-check step {rechecked} " in next(a["message"] for a in inline["alerts"] if a["kind"] == "nonfinite")
    assert where[6] == main and where[rechecked] == main  # the skipped step, and the re-checked one (its hooks)
    assert sum(name == "gradkit-tracking" for name in where.values()) >= 10
    assert all(name == main for _, name in inline["seen"])


def test_flush_waits_for_the_thread_and_history_reads_are_safe_meanwhile(tmp_path):
    tracker = gk.Tracker(tmp_path, every=1, background=True)
    sink, gate = tracker._sink, threading.Event()
    write = sink.write

    def held(logged, **kwargs):
        gate.wait(10)  # the writer is behind: nothing is written until the gate opens
        time.sleep(0.002)
        write(logged, **kwargs)

    sink.write = held
    train(tracker, 12)
    assert tracker.history == [] and tracker._writer.pending() == 12
    gate.set()
    lengths = []
    while tracker._writer.pending():  # read while the thread writes
        lengths.append(len(tracker.history))
    tracker.flush()
    assert lengths == sorted(lengths) and len(set(lengths)) > 1
    assert [r["step"] for r in tracker.history] == list(range(1, 13))  # none lost, none twice, in order
    on_disk = [r["step"] for r in read_jsonl(tmp_path / "tracking.jsonl") if r["type"] == "step"]
    assert on_disk == list(range(1, 13))
    tracker.close()


def test_flush_returns_only_once_the_thread_has_written_everything():
    tracker = gk.Tracker(every=1, background=True)
    sink = tracker._sink
    write = sink.write

    def slow(logged, **kwargs):
        time.sleep(0.01)
        write(logged, **kwargs)

    sink.write = slow
    train(tracker, 5)
    tracker.flush()
    assert tracker._writer.pending() == 0 and [r["step"] for r in tracker.history] == [1, 2, 3, 4, 5]
    tracker.close()


def _fail_at_step(tracker, step, raised):
    """Make the JSONL writer fail (a full disk) on the record of `step`; the raised error goes into `raised`."""
    jsonl = tracker._sink.writers[0]
    write_line = jsonl.write_line

    def failing_write_line(line):
        if f'"step": {step},' in line:
            error = OSError(28, "No space left on device")
            raised.append(error)
            raise error
        write_line(line)

    jsonl.write_line = failing_write_line


@pytest.mark.parametrize("background", [False, True])
def test_a_write_error_is_raised_once_on_the_training_thread_and_later_records_still_come(
    tmp_path, fixed_time, background
):
    torch.manual_seed(0)
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = gk.Tracker(tmp_path, every=1, background=background)
    raised, caught = [], []
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    for step in range(1, 7):
        if step == 2:
            _fail_at_step(tracker, 3, raised)  # after attach: the writer is open then
        opt.zero_grad()
        ((model(x) - y) ** 2).sum().backward()
        for call in (lambda: tracker.track(model), opt.step, tracker.after_step):
            try:
                call()
            except OSError as error:  # by hand: the loop goes on after a failed write
                caught.append((step, error))
    try:
        tracker.flush()
    except OSError as error:
        caught.append(("flush", error))
    tracker.close()
    assert len(raised) == 1 and len(caught) == 1
    at, error = caught[0]
    assert error is raised[0]  # the original exception, so `except OSError` works as inline
    if background:
        frames = [frame.name for frame in traceback.extract_tb(error.__traceback__)]
        assert "failing_write_line" in frames and "_run" in frames  # the writer thread's frames come along
        assert any("writer thread" in note for note in getattr(error, "__notes__", ["writer thread"]))
        assert at == "flush" or at >= 3
    else:
        assert at == 3
    assert [r["step"] for r in tracker.history] == [1, 2, 3, 4, 5, 6]  # kept in memory before the file write
    on_disk = [r["step"] for r in read_jsonl(tmp_path / "tracking.jsonl") if r["type"] == "step"]
    assert on_disk == [1, 2, 4, 5, 6]


def test_close_joins_the_thread_and_a_later_record_starts_a_new_one():
    tracker = gk.Tracker(every=1, background=True)
    train(tracker, 3)
    thread = tracker._writer._thread
    assert thread.is_alive()
    tracker.close()
    assert not thread.is_alive() and tracker._writer is None
    assert [r["step"] for r in tracker.history] == [1, 2, 3]


def test_a_tracker_collected_without_close_ends_its_thread_after_writing_its_queue(tmp_path):
    tracker = gk.Tracker(tmp_path, every=1, background=True)
    release = threading.Event()
    sink = tracker._sink
    write = sink.write

    def held(logged, **kwargs):
        release.wait(10)  # the records wait on the thread while the tracker goes away
        write(logged, **kwargs)

    sink.write = held
    train(tracker, 4)
    thread, alive = tracker._writer._thread, weakref.ref(tracker)
    del tracker
    gc.collect()
    assert alive() is None  # the thread does not keep the tracker alive
    release.set()
    thread.join(10)
    assert not thread.is_alive()
    assert [r["step"] for r in read_jsonl(tmp_path / "tracking.jsonl") if r["type"] == "step"] == [1, 2, 3, 4]
    sink.close()  # the writers of a tracker never closed stay open (as without the thread)


def test_an_unclosed_tracker_with_a_stuck_writer_does_not_hang_interpreter_exit(tmp_path):
    script = textwrap.dedent(
        """
        import threading, torch, gradkit as gk
        model = torch.nn.Linear(3, 2)
        tracker = gk.Tracker(every=1, background=True)
        sink = tracker._sink
        sink.write = lambda logged, **kwargs: threading.Event().wait()  # a write that never returns
        for _ in range(3):
            model(torch.randn(4, 3)).sum().backward()
            tracker.track(model)
            tracker.after_step()
        assert tracker._writer.pending() >= 1
        print("exiting")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "exiting"


def test_a_writer_that_falls_behind_makes_the_training_thread_wait_at_the_bound(monkeypatch):
    monkeypatch.setattr(writer_thread, "BOUND", 2)
    tracker = gk.Tracker(every=1, background=True)
    sink, gate = tracker._sink, threading.Event()
    write = sink.write
    queued = []

    def held(logged, **kwargs):
        queued.append(tracker._writer.pending())  # this one included
        gate.wait(10)
        write(logged, **kwargs)

    sink.write = held
    opener = threading.Timer(0.3, gate.set)  # 10 records cannot fit in 2 queued + 1 being written: training waits
    opener.start()
    began = time.monotonic()
    train(tracker, 10)
    waited = time.monotonic() - began
    tracker.close()
    opener.join()
    assert waited >= 0.25  # the training thread waited for the writer instead of queueing more
    assert max(queued) <= 3  # two queued and the one being written: memory stays bounded
    assert [r["step"] for r in tracker.history] == list(range(1, 11))


def test_writer_thread_put_waits_while_the_queue_is_full():
    release, written = threading.Event(), []
    writer = WriterThread(lambda item: (release.wait(10), written.append(item)), bound=2)
    for item in range(3):  # one taken by the thread (waiting on `release`), two queued
        writer.put(item)
    deadline = time.monotonic() + 5
    while writer.pending() != 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    blocked = threading.Thread(target=writer.put, args=(3,))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive() and writer.pending() == 3  # the fourth waits for room
    release.set()
    blocked.join(10)
    writer.wait_idle()
    assert written == [0, 1, 2, 3]
    writer.stop()
    writer.join()
    with pytest.raises(RuntimeError, match="stopped"):
        writer.put(4)


def test_writer_thread_keeps_the_first_error_and_logs_a_second(caplog):
    errors = [ValueError("first"), KeyError("second")]
    writer = WriterThread(lambda item: (_ for _ in ()).throw(errors[item]))
    with caplog.at_level(logging.ERROR, logger="gradkit.tracking"):
        writer.put(0)
        writer.put(1)
        writer.wait_idle()
        with pytest.raises(ValueError, match="first"):
            writer.raise_error()
        writer.raise_error()  # once only
    assert any(record.exc_info and record.exc_info[1] is errors[1] for record in caplog.records)
    writer.stop()
    writer.join()


def test_writer_thread_bound_must_be_a_positive_int():
    with pytest.raises(ValueError, match="bound must be a positive int, got 0"):
        WriterThread(print, bound=0)


@pytest.mark.parametrize("late", [False, True])
def test_background_writing_frees_each_steps_gradients_after_the_step(late):
    # A quiet record goes to the thread without its gradients: the pipeline's p.grad = None frees them.
    tracker = gk.Tracker(every=1, detail_every=100, background=True)
    refs = []
    observe = tracker.observe

    def spying(ctx, report):
        refs.extend(weakref.ref(g) for g in ctx.grads)
        observe(ctx, report)
        held = tracker._pending.open.grads if tracker._pending.open is not None else None
        assert held is None or held.grads is not None  # strong until the step's after_step

    tracker.observe = spying
    train(tracker, 3, late=late)
    assert refs and all(ref() is None for ref in refs)
    tracker.close()
    assert [r["step"] for r in tracker.history] == [1, 2, 3]


@pytest.mark.cuda
def test_on_cuda_the_default_writes_on_the_thread_and_records_equal_the_inline_ones(tmp_path, fixed_time):
    texts = {}
    for background in (None, False):
        torch.manual_seed(0)
        model = Net().cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        tracker = gk.Tracker(tmp_path / str(background), every=1, detail_every=4, background=background)
        seen = spy_writes(tracker)
        pipe = gk.GradientPipeline(model, clip=gk.ClipByGlobalNorm(0.5), tracker=tracker)
        g = torch.Generator().manual_seed(1)
        for _ in range(12):
            x, y = torch.randn(8, 6, generator=g).cuda(), torch.randn(8, 2, generator=g).cuda()
            pipe.backward(((model(x) - y) ** 2).sum(), num_items=8)
            pipe.step(opt)
        tracker.close()
        assert tracker._threaded is (background is None)
        names = {name for _, name in seen}
        assert names == ({"gradkit-tracking"} if background is None else {threading.current_thread().name})
        assert [r["step"] for r in tracker.history] == list(range(1, 13))
        texts[background] = (tmp_path / str(background) / "tracking.jsonl").read_bytes()
    assert texts[None] == texts[False]
