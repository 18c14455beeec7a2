"""The tracker's host read does not stall the step: records are written once their copy has completed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradkit as gk
from gradkit.tracking.writers import read_jsonl


class LateEvent:
    """An event that completes only when the test says so (a GPU's copy still running)."""

    def __init__(self, log):
        self.complete = False
        self.waited = False
        log.append(self)

    def query(self):
        return self.complete

    def synchronize(self):
        self.waited = True
        self.complete = True


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2)).double()


def run(tracker, steps, *, nan_at=None, on_step=None):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pipe = gk.GradientPipeline(model, clip=gk.ClipByGlobalNorm(0.5), tracker=tracker)
    g = torch.Generator().manual_seed(1)
    norms = []
    for step in range(1, steps + 1):
        x, y = torch.randn(8, 6, generator=g).double(), torch.randn(8, 2, generator=g).double()
        loss = ((model(x) - y) ** 2).sum()
        if step == nan_at:
            loss = loss * float("nan")
        pipe.backward(loss, num_items=8)
        pipe.step(opt)
        norms.append(float(pipe.last.total_norm))
        if on_step is not None:
            on_step(step)
    return norms


def test_records_wait_for_their_copy_and_come_in_order_none_lost(tmp_path):
    events = []
    tracker = gk.Tracker(tmp_path, every=1, detail_every=3)
    tracker._new_event = lambda device: LateEvent(events)
    seen = []

    def on_step(step):
        seen.append(len(tracker.history))
        if step == 4:  # the copies of steps 1..3 complete: their records are written at the next step
            for event in events:
                event.complete = True

    norms = run(tracker, 8, on_step=on_step)
    assert seen[:4] == [0, 0, 0, 0]  # nothing written while every copy is still running
    assert seen[4] >= 3  # written at a later step, by a poll
    assert not any(e.waited for e in events)  # the step path never waited
    tracker.close()  # waits for the rest
    assert [r["step"] for r in tracker.history] == list(range(1, 9))
    on_disk = [r for r in read_jsonl(tmp_path / "tracking.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in on_disk] == list(range(1, 9))
    for record, norm in zip(on_disk, norms):
        assert record["global"]["norm_pre_clip"] == pytest.approx(norm, rel=1e-12)
    assert [r["detail"] for r in on_disk] == [True, False, True, False, False, True, False, False]
    assert on_disk[2]["modules"]["0"]["update_to_weight"] > 0  # the ratio of a later-written detail step


def test_late_records_equal_the_immediate_ones(tmp_path):
    immediate = gk.Tracker(every=1, detail_every=2)
    run(immediate, 6)
    late = gk.Tracker(every=1, detail_every=2)
    late._new_event = lambda device: LateEvent([])
    run(late, 6)
    assert late.history == []
    late.flush()
    strip = lambda r: {k: v for k, v in r.items() if k != "time"}  # noqa: E731
    assert [strip(r) for r in late.history] == [strip(r) for r in immediate.history]


def test_alerts_fire_from_the_late_record_and_state_dict_flushes():
    events = []
    tracker = gk.Tracker(every=1)
    tracker._new_event = lambda device: LateEvent(events)
    run(tracker, 4, nan_at=3)
    assert tracker.alerts == []  # the copies have not completed: no record, no alert yet
    state = tracker.state_dict()  # waits, so that the alert state includes every logged step
    assert [r["step"] for r in tracker.history] == [1, 2, 3, 4]
    nonfinite = [a for a in tracker.alerts if a.kind == "nonfinite"]
    assert [a.step for a in nonfinite] == [3] and state["alerts"][0]["step"] == 3
    assert tracker.history[2]["global"]["skipped"] is True
    # Counted later, the gradients of step 3 were gone: the counts are unknown, not invented.
    assert tracker.history[2]["params"]["0.weight"]["nan"] is None
    assert "re-check step 5" in nonfinite[0].message  # the first step whose backward had not run yet


def test_records_are_written_in_after_step_once_the_step_is_queued(tmp_path):
    # A copy that completes before the next step's observe is written in that step's after_step (the device
    # still has the step's work queued then), not in observe (before the optimizer's work is queued).
    events = []
    tracker = gk.Tracker(tmp_path, every=1)
    tracker._new_event = lambda device: LateEvent(events)
    written = {"observe": [], "after_step": []}
    for name in written:
        method = getattr(tracker, name)

        def timed(*args, name=name, method=method):
            before = len(tracker.history)
            method(*args)
            written[name].append(len(tracker.history) - before)

        setattr(tracker, name, timed)

    def on_step(step):
        for event in events:  # every copy completes before the next step
            event.complete = True

    run(tracker, 5, on_step=on_step)
    assert written["observe"] == [0] * 5
    assert written["after_step"] == [0] + [1] * 4  # step n's record, at step n + 1
    tracker.close()
    assert [r["step"] for r in tracker.history] == [1, 2, 3, 4, 5]


def test_without_after_step_records_are_written_in_the_next_observe():
    # By hand, after_step is optional: then the next logged step's observe writes the record.
    model = make_model()
    tracker = gk.Tracker(every=1, update_ratio=False)  # no ||Δw|| read, which starts only at the next step
    events = []
    tracker._new_event = lambda device: LateEvent(events)
    x = torch.randn(4, 6, dtype=torch.float64)
    lengths = []
    for _ in range(3):
        model.zero_grad()
        model(x).square().sum().backward()
        tracker.track(model)
        lengths.append(len(tracker.history))
        for event in events:
            event.complete = True
    assert lengths == [0, 1, 2]
    tracker.close()
    assert [r["step"] for r in tracker.history] == [1, 2, 3]


def _ordinary_steps_tracker(late: bool) -> gk.Tracker:
    """A tracker logging every step, detail steps aside; with `late`, each record waits beyond its step."""
    tracker = gk.Tracker(every=1, detail_every=100)
    if late:
        tracker._new_event = lambda device: LateEvent([])
    return tracker


@pytest.mark.parametrize("late", [False, True])
def test_a_logged_step_does_not_keep_its_gradients_alive_after_the_step(late):
    # The gradients are held strongly only until the step's after_step (they are alive then anyway); a record
    # still in flight after it holds them weakly, so the pipeline's p.grad = None frees them.
    import weakref

    tracker = _ordinary_steps_tracker(late)
    refs = []

    observe = tracker.observe

    def spying(ctx, report):
        refs.extend(weakref.ref(g) for g in ctx.grads)
        observe(ctx, report)

    tracker.observe = spying
    run(tracker, 3)
    assert refs and all(ref() is None for ref in refs)  # every step's gradients are gone
    tracker.flush()
    assert [r["step"] for r in tracker.history] == [1, 2, 3]


def test_by_hand_without_after_step_the_gradients_are_held_weakly_at_once():
    import weakref

    model = make_model()
    tracker = gk.Tracker(every=1, update_ratio=False)
    tracker._new_event = lambda device: LateEvent([])  # the record waits beyond the step
    model(torch.randn(4, 6, dtype=torch.float64)).square().sum().backward()
    tracker.track(model)
    refs = [weakref.ref(p.grad) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    assert all(ref() is None for ref in refs)
    tracker.close()
    assert tracker.history[0]["params"]["0.weight"]["nan"] == 0  # finite norms: counts known without the grads


def test_a_non_finite_ordinary_step_written_in_its_after_step_counts_from_the_held_gradients():
    tracker = gk.Tracker(every=1, detail_every=100)  # step 3 is an ordinary logged step (no device counts)
    run(tracker, 4, nan_at=3)
    record = tracker.history[2]
    assert record["detail"] is False and record["global"]["skipped"] is True
    assert record["params"]["0.weight"]["nan"] == 12 * 6  # counted on the host, the gradients still held
    assert record["modules"]["0"]["nan"] == 12 * 6 + 12


@pytest.mark.parametrize("late", [False, True])
def test_a_logged_step_holds_its_gradients_strongly_until_its_after_step(late):
    # Strong until after_step: a thousand weak references per logged step are objects the cyclic collector
    # walks. A record still waiting after the step holds them weakly (see the test above).
    tracker = _ordinary_steps_tracker(late)
    held = []
    observe, after_step = tracker.observe, tracker.after_step

    def observing(ctx, report):
        observe(ctx, report)
        logged = tracker._pending.open
        if logged is not None and logged.grads is not None:
            held.append(("observe", logged.grads.grads is not None, logged.grads.refs is None, logged.grads))

    def stepping(*args, **kwargs):
        after_step(*args, **kwargs)
        for _, _, _, refs in held[-1:]:
            held.append(("after_step", refs.grads is not None, refs.refs is None, refs))

    tracker.observe, tracker.after_step = observing, stepping
    run(tracker, 3)
    at_observe = [(strong, no_weak) for when, strong, no_weak, _ in held if when == "observe"]
    after = [(strong, no_weak) for when, strong, no_weak, _ in held if when == "after_step"]
    assert len(at_observe) >= 2 and all(strong and no_weak for strong, no_weak in at_observe)
    if late:  # the record waits beyond the step: from its after_step on, weak references only
        assert after and all(not strong and not no_weak for strong, no_weak in after)
    tracker.flush()
    assert [r["step"] for r in tracker.history] == [1, 2, 3]


def test_a_tracker_attached_to_another_model_writes_the_first_ones_records_first_and_says_so(tmp_path, caplog):
    # A trainer's second fit on a new model re-attaches the tracker. The first model's records still in flight
    # are written under its names before the second model's run header, the hooks armed on its module are
    # removed, and one warning says so; the same model attached again is no news.
    from collections import OrderedDict

    events = []
    tracker = gk.Tracker(tmp_path, every=1, detail_every=2)
    tracker._new_event = lambda device: LateEvent(events)
    first = make_model()
    pipe, opt = gk.GradientPipeline(first, tracker=tracker), torch.optim.SGD(first.parameters(), lr=0.05)
    for _ in range(3):
        pipe.backward(first(torch.randn(4, 6, dtype=torch.float64)).square().sum())
        pipe.step(opt)
    tracker._locator.arm()  # a re-check armed on its module
    assert first[0]._forward_hooks and first[0].weight._backward_hooks
    assert len(tracker.history) == 0 and not any(e.complete for e in events)  # three records in flight
    torch.manual_seed(1)
    second = nn.Sequential(OrderedDict(inp=nn.Linear(6, 5), act=nn.Tanh(), out=nn.Linear(5, 2))).double()
    opt = torch.optim.SGD(second.parameters(), lr=0.05)
    # State of the first model that must not describe the second: a noise estimate, counters, a forced step.
    tracker.noise.load_state_dict({"g2": torch.tensor(1.0), "trace": torch.tensor(2.0), "count": torch.tensor(3.0)})
    tracker._nonfinite.forced.add(4)
    assert tracker._kept._params is not None and tracker._counters.last_logged == 3
    with caplog.at_level("INFO", logger="gradkit.tracking"):
        pipe = gk.GradientPipeline(second, tracker=tracker)
        assert tracker._kept._params is None  # the first model's element counts and layout are forgotten
        assert all(float(v) == 0 for v in tracker.noise.state_dict().values())
        assert tracker._counters.state_dict()["last_logged"] == 0 and tracker.step == 0
        assert tracker._nonfinite.forced == set() and not tracker._locator.armed
        for _ in range(2):
            pipe.backward(second(torch.randn(4, 6, dtype=torch.float64)).square().sum())
            pipe.step(opt)
        gk.GradientPipeline(second, tracker=tracker)  # the same model again: no note
    # The alert rules' running averages are the second model's only (the first one's modules were "0" and "2").
    assert set(tracker.rules.state_dict()["modules"]) == {"(global)", "inp", "out"}
    notes = [r.getMessage() for r in caplog.records if "another model" in r.getMessage()]
    assert len(notes) == 1 and "4 parameter tensors, 47 elements" in notes[0] and "log_dir" in notes[0]
    assert not first[0]._forward_hooks and not first[0].weight._backward_hooks
    tracker.close()
    lines = read_jsonl(tmp_path / "tracking.jsonl")
    first_names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    second_names = ["inp.weight", "inp.bias", "out.weight", "out.bias"]
    kinds = [(line["type"], line["params"] if line["type"] == "run" else list(line["params"])) for line in lines]
    assert [k for k, _ in kinds] == [
        "run",
        "step",
        "step",
        "step",
        "run",
        "step",
        "step",
        "run",
    ]  # records, then a header
    assert [names for kind, names in kinds if kind == "step"] == [first_names] * 3 + [second_names] * 2
    assert (
        kinds[0][1] == first_names
        and kinds[4][1] == kinds[7][1] == second_names
        and [line["step"] for line in lines if line["type"] == "step"] == [1, 2, 3, 1, 2]
    )


def nan_run(tracker, model, steps, nan_at):
    pipe, opt = gk.GradientPipeline(model, tracker=tracker), torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(2)
    for step in range(1, steps + 1):
        loss = model(torch.randn(5, 6, generator=g, dtype=torch.float64)).square().mean()
        pipe.backward(loss * float("nan") if step == nan_at else loss)
        pipe.step(opt)
    tracker.flush()


def test_a_new_pipeline_on_the_same_model_drops_an_armed_recheck_with_its_hooks():
    # Step 5 (logged) is non-finite: the hooks are armed to re-check step 6. A new pipeline on the same model
    # (a notebook cell run again) numbers its steps from 1: its step 6 is no re-check, and no hook stays behind.
    model, tracker = make_model(), gk.Tracker(every=5, detail_every=5)
    nan_run(tracker, model, 5, nan_at=5)
    assert tracker._nonfinite.forced == {6} and tracker._locator.armed and model[0]._forward_hooks
    nan_run(tracker, model, 6, nan_at=None)
    assert tracker._nonfinite.forced == set() and not tracker._locator.armed
    assert not model[0]._forward_hooks and not model[0].weight._backward_hooks
    assert [r["step"] for r in tracker.history] == [1, 5, 1, 5]


def test_a_new_pipeline_on_the_same_model_starts_its_counters_afresh():
    # Step 7 is skipped (non-finite) but not logged (every=5): its count belonged to the old numbering, which
    # said "since step 5"; the new pipeline's step 1 counts its own steps only.
    model, tracker = make_model(), gk.Tracker(every=5, detail_every=5)
    nan_run(tracker, model, 7, nan_at=7)
    nan_run(tracker, model, 2, nan_at=None)
    new_first = tracker.history[-1]
    assert new_first["step"] == 1 and new_first["steps_since_log"] == 1
    assert new_first["global"]["skipped_steps"] == 0
    assert [a for a in tracker.alerts if a.kind == "nonfinite"] == []


def test_the_same_module_with_other_trainable_parameters_is_named_so(tmp_path, caplog):
    model = make_model()
    tracker = gk.Tracker(tmp_path, every=1)
    with caplog.at_level("WARNING", logger="gradkit.tracking"):
        nan_run(tracker, model, 2, nan_at=None)
        model[0].requires_grad_(False)  # a layer frozen
        nan_run(tracker, model, 2, nan_at=None)
    notes = [r.getMessage() for r in caplog.records if "Tracker:" in r.getMessage()]
    assert len(notes) == 1 and "the same model with other trainable parameters (2 parameter tensors" in notes[0]
    assert "another model" not in notes[0] and "log_dir" not in notes[0]
    tracker.close()


def test_only_the_rank_that_writes_warns_about_another_model(caplog):
    tracker = gk.Tracker(every=1)
    tracker.writes = False  # as on a rank other than 0 (without gather it records nothing)
    with caplog.at_level("WARNING", logger="gradkit.tracking"):
        nan_run(tracker, make_model(), 1, nan_at=None)
        nan_run(tracker, make_model(), 1, nan_at=None)
    assert not [r for r in caplog.records if "another model" in r.getMessage()]
