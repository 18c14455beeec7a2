"""Tracker core: statistics against a direct computation, no host reads between logs, JSONL schema, state, bad input."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradkit as gk
from gradkit.tracking.report import load_run
from gradkit.tracking.writers import GLOBAL_FIELDS, NOISE_FIELDS, STAT_FIELDS, STEP_FIELDS, read_jsonl, schema_errors
from host_reads import count_host_reads

DOCS = Path(__file__).resolve().parents[1] / "docs" / "tracking.md"


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2)).double()


def batches(count: int, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 6, generator=g).double(), torch.randn(size, 2, generator=g).double()) for _ in range(count)
    ]


def train(pipe, model, opt, data):
    for x, y in data:
        pipe.backward(((model(x) - y) ** 2).sum(), num_items=x.shape[0])
        pipe.step(opt)


class Capture(gk.Tracker):
    """A Tracker that also keeps copies of what it was shown on logging steps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = {}

    def observe(self, ctx, report):
        if self.wants(report.step):
            self.seen[report.step] = {
                "grads": [g.clone() for g in ctx.grads],
                "before": [p.detach().clone() for p in ctx.params],
                "coef": float(report.clip_coef),
                "norms": (ctx.pre_clip_norms.clone(), ctx.norms().clone()),  # as measured, before any text
            }
        super().observe(ctx, report)

    def after_step(self, ctx, report):
        if report.step in self.seen:
            self.seen[report.step]["after"] = [p.detach().clone() for p in ctx.params]
        super().after_step(ctx, report)


def direct(grads, before, after):
    """Per-tensor statistics computed the obvious way."""
    out = []
    for g, w0, w1 in zip(grads, before, after):
        out.append({
            "norm": float(g.norm()), "max_abs": float(g.abs().max()), "rms": float(g.pow(2).mean().sqrt()),
            "zero_frac": float((g == 0).double().mean()), "weight_norm": float(w0.norm()),
            "grad_to_weight": float(g.norm() / w0.norm()), "update_to_weight": float((w1 - w0).norm() / w0.norm()),
            "sq": float(g.pow(2).sum()), "w_sq": float(w0.pow(2).sum()), "d_sq": float((w1 - w0).pow(2).sum()),
            "numel": g.numel(),
        })  # fmt: skip
    return out


def test_statistics_equal_a_direct_per_parameter_and_per_module_computation():
    model = make_model()
    with torch.no_grad():
        model[2].weight[:, :5] = 0.0  # hidden units 0-4 feed nothing: their rows of 0.weight get exact-zero gradients
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = Capture(every=2, detail_every=2)
    pipe = gk.GradientPipeline(model, accumulation_steps=2, clip=gk.ClipByGlobalNorm(0.3), tracker=tracker)
    train(pipe, model, opt, batches(8))
    assert [r["step"] for r in tracker.history] == [1, 2, 4]
    names = [n for n, _ in model.named_parameters()]
    for record in tracker.history:
        seen = tracker.seen[record["step"]]
        expected = direct(seen["grads"], seen["before"], seen["after"])
        for name, e in zip(names, expected):
            got = record["params"][name]
            for key in ("norm", "max_abs", "rms", "zero_frac", "weight_norm", "grad_to_weight", "update_to_weight"):
                assert got[key] == pytest.approx(e[key], rel=1e-9, abs=1e-15), (name, key)
            assert got["norm_pre_clip"] == pytest.approx(e["norm"] / seen["coef"], rel=1e-9)
            assert got["nan"] == got["inf"] == 0 and got["numel"] == e["numel"]
        for module in ("0", "2"):
            members = [e for n, e in zip(names, expected) if n.startswith(module + ".")]
            got = record["modules"][module]
            numel = sum(e["numel"] for e in members)
            assert got["norm"] == pytest.approx(math.sqrt(sum(e["sq"] for e in members)), rel=1e-9)
            assert got["max_abs"] == pytest.approx(max(e["max_abs"] for e in members), rel=1e-12)
            assert got["rms"] == pytest.approx(math.sqrt(sum(e["sq"] for e in members) / numel), rel=1e-9)
            assert got["zero_frac"] == pytest.approx(
                sum(e["zero_frac"] * e["numel"] for e in members) / numel, rel=1e-12
            )
            w = math.sqrt(sum(e["w_sq"] for e in members))
            assert got["update_to_weight"] == pytest.approx(math.sqrt(sum(e["d_sq"] for e in members)) / w, rel=1e-9)
    assert tracker.history[0]["params"]["0.weight"]["zero_frac"] > 0
    last = tracker.history[-1]["global"]
    assert last["clip_coef"] < 1 and last["clipped_steps"] == 2 and last["clip_rate"] == 1.0
    assert tracker.history[-1]["steps_since_log"] == 2


def test_standalone_track_records_an_item_count_above_2_24_exactly():
    # float32 holds integers exactly only up to 2**24 (a token count of a large batch passes it).
    model = make_model()
    tracker = gk.Tracker(every=1)
    x, y = batches(1)[0]
    ((model(x) - y) ** 2).mean().backward()
    tracker.track(model, items=2**24 + 1)
    tracker.close()
    assert tracker.history[-1]["global"]["items"] == 2**24 + 1


def test_standalone_track_counts_nan_and_inf_and_completes_the_update_ratio():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = gk.Tracker(every=1)
    x, y = batches(1)[0]
    ((model(x) - y) ** 2).mean().backward()
    tracker.track(model, items=8)
    opt.step()
    tracker.after_step()
    record = tracker.history[-1]
    assert record["step"] == 1 and record["global"]["items"] == 8
    assert record["modules"]["0"]["update_to_weight"] > 0
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    model[2].bias.grad[0] = float("nan")
    model[2].weight.grad[0, :3] = float("inf")
    tracker.track(model)
    tracker.close()
    bad = tracker.history[-1]
    assert bad["params"]["2.bias"]["nan"] == 1 and bad["params"]["2.weight"]["inf"] == 3
    assert bad["modules"]["2"]["nan"] == 1 and bad["modules"]["2"]["inf"] == 3
    assert bad["global"]["skipped"] is True and bad["global"]["norm"] is None  # non-finite values are null in JSON
    assert [(a.kind, a.name) for a in tracker.last_alerts] == [("nonfinite", "2")]


def test_standalone_track_follows_another_model_with_the_same_names(caplog):
    # Two models of one architecture have the same parameter names: track(second) must record the second one's
    # gradients (before, the names matched and the first model's tensors stayed, with their gradients gone).
    first, second = make_model(0), make_model(1)
    tracker = gk.Tracker(every=1)
    x, y = batches(1)[0]
    ((first(x) - y) ** 2).mean().backward()
    tracker.track(first)
    first.zero_grad(set_to_none=True)
    (100 * ((second(x) - y) ** 2).mean()).backward()
    with caplog.at_level("WARNING", logger="gradkit.tracking"):
        tracker.track(second)
        tracker.track(second)  # the same model again: no news
    tracker.close()
    assert tracker._params[0] is second[0].weight
    record = tracker.history[-2]
    assert record["step"] == 1  # a new run header, steps counted from 1
    want = second[2].weight.grad.norm().item()
    assert record["params"]["2.weight"]["norm"] == pytest.approx(want, rel=1e-9)
    notes = [r.getMessage() for r in caplog.records if "another model" in r.getMessage()]
    assert len(notes) == 1 and "in `history`" in notes[0] and "log_dir" not in notes[0]


def test_standalone_track_goes_on_counting_when_a_layer_is_frozen(tmp_path):
    # Fine-tuning freezes a layer mid-loop: the same loop goes on, so do its step numbers (a pipeline's do too),
    # and the report reads the whole loop, not the steps after the freeze alone.
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = gk.Tracker(tmp_path, every=1)
    for i, (x, y) in enumerate(batches(5)):
        if i == 3:
            model[0].weight.requires_grad_(False)
            model[0].weight.grad = None
        ((model(x) - y) ** 2).sum().backward()
        tracker.track(model)
        opt.step()
        tracker.after_step()
        opt.zero_grad(set_to_none=True)
    tracker.close()
    assert [r["step"] for r in tracker.history] == [1, 2, 3, 4, 5]
    assert "0.weight" in tracker.history[2]["params"] and "0.weight" not in tracker.history[3]["params"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one run: steps do not start over
        _, records, _ = load_run(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]


def test_standalone_track_measures_a_parameter_resized_through_data_again():
    # A layer grown in place (the same Parameter, new .data): element counts and the detail layout are found again.
    model = make_model()
    tracker = gk.Tracker(every=1, detail_every=1)
    for i, (x, _) in enumerate(batches(3)):
        if i == 2:
            model[0].weight.data = torch.randn(24, 6, dtype=torch.float64)
            model[0].bias.data = torch.randn(24, dtype=torch.float64)
            model[2].weight.data = torch.randn(2, 24, dtype=torch.float64)
        model(x).pow(2).sum().backward()
        tracker.track(model)
        model.zero_grad(set_to_none=True)
    tracker.flush()
    got = {name: entry["numel"] for name, entry in tracker.history[-1]["params"].items()}
    assert got == {name: p.numel() for name, p in model.named_parameters()} == {
        "0.weight": 144, "0.bias": 24, "2.weight": 48, "2.bias": 2,
    }  # fmt: skip


def track_closing_midway(tracker: gk.Tracker) -> gk.Tracker:
    """Four steps tracked with `track()`, the tracker closed after the second and at the end."""
    model = make_model()
    for i, (x, y) in enumerate(batches(4)):
        ((model(x) - y) ** 2).sum().backward()
        tracker.track(model)
        model.zero_grad(set_to_none=True)
        if i == 1:
            tracker.close()
    tracker.close()
    return tracker


def test_a_closed_tracker_tracked_on_writes_its_steps_to_the_same_log(tmp_path):
    # close() then more steps on the same model (a notebook cell run on): the run goes on in the same file,
    # appending, with no new run header; before, those records went to `history` only.
    tracker = track_closing_midway(gk.Tracker(tmp_path, every=1))
    lines = read_jsonl(tmp_path / "tracking.jsonl")
    assert [(line["type"], line.get("step")) for line in lines] == [("run", None), *(("step", s) for s in range(1, 5))]
    assert lines[1:] == tracker.history


def test_history_keeps_a_later_alert_after_the_caller_clears_alerts():
    # tracker.alerts is the caller's list: clearing the alerts handled must not cut newer ones later.
    model = make_model()
    tracker = gk.Tracker(every=1, history=3)
    for step, (x, y) in enumerate(batches(5), start=1):
        (((model(x) - y) ** 2).sum() * (math.nan if step in (1, 2, 5) else 1.0)).backward()
        tracker.track(model)
        model.zero_grad(set_to_none=True)
        if step == 2:
            tracker.flush()
            assert [a.step for a in tracker.alerts] == [1, 2]
            tracker.alerts.clear()
    tracker.flush()
    assert [(a.step, a.kind) for a in tracker.alerts] == [(5, "nonfinite")]


def test_a_closed_tracker_tracked_on_draws_histograms_on_its_next_detail_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    track_closing_midway(gk.Tracker(tmp_path, writers=("jsonl", "tensorboard"), every=1, detail_every=1))
    steps = set()
    for events in tmp_path.glob("events.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"histograms": 0})
        accumulator.Reload()
        steps |= {e.step for tag in accumulator.Tags()["histograms"] for e in accumulator.Histograms(tag)}
    assert steps == {1, 2, 3, 4}


def test_non_logging_steps_make_no_host_reads(monkeypatch):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = gk.Tracker(every=4)
    pipe = gk.GradientPipeline(
        model, accumulation_steps=2, clip=[gk.ClipByGlobalNorm(0.5), gk.ZClip(warmup=1)], tracker=tracker
    )
    data = batches(16)
    losses_per_step = []
    counter = count_host_reads(monkeypatch)
    inside = {"n": 0}
    for name in ("wants", "observe", "after_step"):
        method = getattr(tracker, name)

        def wrapped(*args, _method=method, **kwargs):
            before = counter["n"]
            result = _method(*args, **kwargs)
            inside["n"] += counter["n"] - before
            return result

        setattr(tracker, name, wrapped)
    for i in range(0, 16, 2):
        before, before_inside = counter["n"], inside["n"]
        train(pipe, model, opt, data[i : i + 2])
        losses_per_step.append((pipe.steps, counter["n"] - before, inside["n"] - before_inside))
    for step, total, in_tracker in losses_per_step:
        if step in (1, 4, 8):
            assert in_tracker >= 1, step  # logging steps read (so the counter does see the tracker)
        else:
            assert in_tracker == 0, step
            assert total == 1, step  # only the pipeline's own finiteness read
    assert [r["step"] for r in tracker.history] == [1, 4, 8]
    assert tracker.history[-1]["global"]["clipped_steps"] == 4  # counted on the device between logs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_float32_statistics_are_written_with_float32_precision(tmp_path, dtype):
    # Norms of float32, bf16 and fp16 gradients are measured in float32: the log writes 9 significant digits,
    # which read back as exactly the measured float32 values; float64 ones are written exactly (repr).
    model = make_model().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = Capture(tmp_path, every=1, detail_every=2)
    pipe = gk.GradientPipeline(model, clip=gk.ClipByGlobalNorm(0.3), tracker=tracker)
    for x, y in batches(4):
        pipe.backward(((model(x.to(dtype)) - y.to(dtype)) ** 2).sum())
        pipe.step(opt)
    tracker.close()
    lines = (tmp_path / "tracking.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines[1:]]
    assert records == tracker.history  # the history is what the file says
    names = [n for n, _ in model.named_parameters()]
    for record in records:
        pre, norm = tracker.seen[record["step"]]["norms"]
        for key, measured in (("norm_pre_clip", pre), ("norm", norm)):
            got = [record["params"][name][key] for name in names]
            assert all(type(v) is float for v in got)
            if dtype == torch.float64:
                assert got == measured.tolist()  # exact
            else:
                assert measured.dtype == torch.float32
                assert np.array_equal(np.float32(got), measured.numpy())  # float32's round trip
                assert got != measured.tolist()  # 9 digits, not the float64 text of a float32
    if dtype == torch.float64:  # float64 statistics: the text is json.dumps of the record
        assert lines[1:] == [json.dumps(r, allow_nan=False) for r in records]


def test_jsonl_records_follow_the_documented_schema(tmp_path):
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tracker = gk.Tracker(tmp_path, every=1, meta={"max_norm": 1.0})
    pipe = gk.GradientPipeline(model, accumulation_steps=2, clip=gk.ClipByGlobalNorm(1.0), tracker=tracker)
    train(pipe, model, opt, batches(6))
    tracker.close()
    lines = (tmp_path / "tracking.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: no NaN literals
    assert records[0]["type"] == "run" and records[0]["params"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [r["step"] for r in records[1:]] == [1, 2, 3]
    for record in records:
        assert schema_errors(record) == [], record
    assert records[-1]["noise"]["b_simple"] is None or records[-1]["noise"]["b_simple"] > 0
    assert records[1:] == tracker.history
    # Lines are encoded from the columns: the text is what json.dumps writes for the record.
    assert lines[1:] == [json.dumps(r, allow_nan=False) for r in tracker.history]
    assert tracker.history is tracker.history  # made once, then kept (one list, growing)
    doc = DOCS.read_text()
    for fields in (STEP_FIELDS, GLOBAL_FIELDS, STAT_FIELDS, NOISE_FIELDS):
        for key in fields:
            assert f"`{key}`" in doc, f"docs/tracking.md does not document {key!r}"


def test_schema_check_catches_a_bad_record():
    record = {"type": "step", "schema": "x", "step": "one"}
    assert schema_errors(record)


def test_truncated_jsonl_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "tracking.jsonl"
    path.write_text('{"type": "run"}\n{"type": "step", "step": 1}\n{"type": "step", "st')
    with pytest.warns(UserWarning, match="line 3"):
        records = read_jsonl(path)
    assert [r["type"] for r in records] == ["run", "step"]


def test_read_jsonl_counts_a_line_that_is_json_but_not_an_object(tmp_path):
    path = tmp_path / "tracking.jsonl"
    path.write_text('{"type": "run"}\n[1, 2]\n\n{"type": "step", "step": 1}\n{"type": "step", "st')
    skipped = []
    with pytest.warns(UserWarning) as caught:
        records = read_jsonl(path, skipped=skipped)
    assert [r["type"] for r in records] == ["run", "step"] and skipped == [2, 5]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "line 2 is not a JSON object" in messages[0] and "line 5" in messages[1]


def test_state_dict_round_trips_and_resumes_identically(tmp_path):
    def fresh():
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        tracker = gk.Tracker(every=2)
        return model, opt, tracker, gk.GradientPipeline(model, accumulation_steps=2, tracker=tracker)

    data = batches(12)
    model, opt, tracker, pipe = fresh()
    train(pipe, model, opt, data)
    reference = tracker.history[-1]

    model, opt, tracker, pipe = fresh()
    train(pipe, model, opt, data[:6])
    torch.save(
        {
            "tracker": tracker.state_dict(),
            "pipe": pipe.state_dict(),
            "model": model.state_dict(),
            "opt": opt.state_dict(),
        },
        tmp_path / "ck.pt",
    )
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    model, opt, tracker, pipe = fresh()
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    pipe.load_state_dict(state["pipe"])
    tracker.load_state_dict(state["tracker"])
    train(pipe, model, opt, data[6:])
    resumed = tracker.history[-1]
    assert resumed["step"] == reference["step"] == 6
    assert resumed["noise"]["g2"] == pytest.approx(reference["noise"]["g2"], rel=1e-9)
    assert resumed["modules"]["0"]["norm"] == pytest.approx(reference["modules"]["0"]["norm"], rel=1e-9)
    with pytest.raises(ValueError, match="missing keys"):
        tracker.load_state_dict({"step": 1})


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"every": 0}, ValueError, "every must be >= 1"),
        ({"every": 2.5}, TypeError, "every must be an integer"),
        ({"every": "10"}, TypeError, "every=10"),
        ({"writers": ("jsonl", "csv")}, ValueError, "unknown writer 'csv'"),
        ({"writers": 3}, TypeError, "writers must be"),
        ({"meta": {"f": object()}}, ValueError, "meta must hold JSON"),
        ({"noise_beta": 1.0}, ValueError, "noise_beta"),
        ({"history": 0}, ValueError, "history must be >= 1"),
        ({"history": True}, TypeError, "history must be an integer"),
        ({"history": 2.0}, TypeError, "or None for all of them"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, words):
    with pytest.raises(error, match=words):
        gk.Tracker(**kwargs)


def test_unwritable_log_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"log_dir .*a_file.* is not writable.*log_dir=None"):
        gk.Tracker(blocker / "run")


def test_track_without_a_model_first_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"track\(model\)"):
        gk.Tracker().track()


def test_gather_collects_every_rank_on_logging_steps(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = make_model()
        tracker = gk.Tracker(every=1, gather=True)
        pipe = gk.GradientPipeline(model, tracker=tracker)
        train(pipe, model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2))
        ranks = tracker.history[-1]["ranks"]
        assert len(ranks) == 1 and ranks[0]["0"] == pytest.approx(tracker.history[-1]["modules"]["0"]["norm_pre_clip"])
    finally:
        dist.destroy_process_group()


def test_logged_steps_between_detail_steps_reuse_the_cached_norms_only():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = gk.Tracker(every=1, detail_every=5)
    pipe = gk.GradientPipeline(model, tracker=tracker)
    for x, y in batches(6):
        pipe.backward(((model(x) - y) ** 2).mean())
        pipe.step(opt)
    tracker.close()
    details = [record["detail"] for record in tracker.history]
    assert details == [True, False, False, False, True, False]
    cheap, full = tracker.history[1]["params"]["0.weight"], tracker.history[4]["params"]["0.weight"]
    assert cheap["norm"] > 0 and cheap["max_abs"] is None and cheap["update_to_weight"] is None
    assert full["max_abs"] > 0 and full["update_to_weight"] > 0


@pytest.mark.parametrize("keep, read_every", [(3, 1), (3, 100), (1, 4), (None, 100)])
def test_history_keeps_the_most_recent_logged_steps_and_the_log_keeps_all(tmp_path, keep, read_every):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = gk.Tracker(tmp_path, every=2, history=keep)
    pipe = gk.GradientPipeline(model, tracker=tracker)
    for i, batch in enumerate(batches(21)):
        train(pipe, model, opt, [batch])
        if (i + 1) % read_every == 0:  # reading converts the records kept so far; the bound holds either way
            assert len(tracker.history) <= (keep or 21)
    tracker.close()
    logged = [1] + list(range(2, 22, 2))  # step 1 and every second step
    expected = logged if keep is None else logged[-keep:]
    assert [record["step"] for record in tracker.history] == expected
    on_disk = [r["step"] for r in read_jsonl(tmp_path / "tracking.jsonl") if r.get("type") == "step"]
    assert on_disk == logged
    assert tracker.history[-1] == [r for r in read_jsonl(tmp_path / "tracking.jsonl") if r.get("step") == 20][-1]


@pytest.mark.parametrize("keep", [None, 3])
def test_history_bounds_the_alerts_kept_in_memory_too(tmp_path, keep):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = gk.Tracker(tmp_path, every=1, history=keep)
    pipe = gk.GradientPipeline(model, tracker=tracker)
    for i, (x, y) in enumerate(batches(12)):  # steps 2, 5, 8 and 11 are non-finite: an alert each
        pipe.backward(((model(x) - y) ** 2).sum() * (math.nan if i % 3 == 1 else 1.0))
        pipe.step(opt)
        if i == 9:
            assert [a.step for a in tracker.alerts] == ([2, 5, 8] if keep is None else [8])  # steps 8-10 kept
    tracker.close()
    assert [r["step"] for r in tracker.history] == (list(range(1, 13)) if keep is None else [10, 11, 12])
    assert [(a.step, a.kind) for a in tracker.alerts] == [(s, "nonfinite") for s in ([2, 5, 8, 11] if keep is None
                                                                                     else [11])]  # fmt: skip
    logged = [a["step"] for r in read_jsonl(tmp_path / "tracking.jsonl") for a in r.get("alerts", [])]
    assert logged == [2, 5, 8, 11]  # the log keeps every alert


@pytest.mark.parametrize("second", [2, 3, 5])
def test_history_keeps_the_alerts_of_its_records_when_steps_start_over(second):
    # A second pipeline numbers its steps from 1 again: the alerts kept are still those of the records kept.
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = gk.Tracker(every=1, history=3)
    for steps in (8, second):
        pipe = gk.GradientPipeline(model, tracker=tracker)
        for i, (x, y) in enumerate(batches(steps)):  # every third step non-finite: steps 2, 5, 8 of each pipeline
            pipe.backward(((model(x) - y) ** 2).sum() * (math.nan if i % 3 == 1 else 1.0))
            pipe.step(opt)
    tracker.flush()
    held = [(a["step"], a["kind"]) for r in tracker.history for a in r["alerts"]]
    assert [r["step"] for r in tracker.history] == [*range(6, 9), *range(1, second + 1)][-3:]
    assert [(a.step, a.kind) for a in tracker.alerts] == held
    assert held == {2: [(8, "nonfinite"), (2, "nonfinite")], 3: [(2, "nonfinite")], 5: [(5, "nonfinite")]}[second]
