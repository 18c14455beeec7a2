"""The trainers' shared boundary (clip stages, then the tracker) attached again, without a trainer installed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradkit as gk
from gradkit.integrations._boundary import Boundary
from gradkit.tracking.kept import KeptShapes
from gradkit.tracking.report import load_run
from gradkit.tracking.writers import read_jsonl


def make_model(seed: int = 0, layers: int = 2) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)]).double()


def fit(boundary: Boundary, model: nn.Module, steps: int, *, close: bool = True) -> None:
    """What a trainer's callback does over one training: attach, the steps, close at the end."""
    boundary.attach(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    g = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        model(torch.randn(3, 4, generator=g, dtype=torch.float64)).square().mean().backward()
        boundary.before_step(step=step, micro_steps=1, items=1)
        opt.step()
        boundary.after_step()
        opt.zero_grad()
    if close:
        boundary.close()


def test_a_second_training_of_the_same_model_is_a_new_run_in_the_same_log(tmp_path):
    # A second fit / train() of the same model: the trainer numbers its steps from 1 again, so the tracker
    # (closed at the end of the first) writes a new run header and the second run's records after the first's.
    # The clip stage's state goes on: the same parameters, the same sum of norms.
    model, zclip = make_model(), gk.ZClip(warmup=2)
    boundary = Boundary(gk.Tracker(tmp_path, every=1), zclip)
    fit(boundary, model, 3)
    fit(boundary, model, 2)
    lines = read_jsonl(tmp_path / "tracking.jsonl")
    assert [(line["type"], line.get("step")) for line in lines] == [
        ("run", None), ("step", 1), ("step", 2), ("step", 3), ("run", None), ("step", 1), ("step", 2),
    ]  # fmt: skip
    assert [r["step"] for r in boundary.tracker.history] == [1, 2, 3, 1, 2]
    assert zclip.state_dict()["count"] == 5
    with pytest.warns(RuntimeWarning, match="the steps start over at step 1 after step 3"):
        _, records, _ = load_run(tmp_path)
    assert records == lines[5:]  # the latest run alone: not its steps 1, 2 beside the first run's step 3


def test_the_same_model_with_a_layer_frozen_starts_the_clip_stages_afresh(caplog):
    # Freezing a layer makes the global norm a sum over other parameters: the clip stages start again from their
    # state at construction, as the tracker starts its alert history and noise estimate again.
    model, zclip = make_model(), gk.ZClip(warmup=2)
    boundary = Boundary(gk.Tracker(every=1), zclip)
    fit(boundary, model, 3, close=False)
    assert zclip.state_dict()["count"] == 3
    model[0].requires_grad_(False)
    with caplog.at_level("WARNING", logger="gradkit.tracking"):
        fit(boundary, model, 1, close=False)
    assert zclip.state_dict()["count"] == 1  # the new set's step only
    assert boundary.names == ["1.weight", "1.bias"]
    assert set(boundary.tracker.rules.state_dict()["modules"]) == {"(global)", "1"}
    notes = [r.getMessage() for r in caplog.records if "Tracker:" in r.getMessage()]
    assert len(notes) == 1 and "the same model with other trainable parameters" in notes[0]


@pytest.fixture
def measured(monkeypatch) -> list[int]:
    """How often a tracker measures a parameter list anew (element counts and layout), one entry per time."""
    counts: list[int] = []
    numels = KeptShapes.numels

    def counting(self, ctx):
        if ctx.params is not self._params:
            counts.append(len(ctx.params))
        return numels(self, ctx)

    monkeypatch.setattr(KeptShapes, "numels", counting)
    return counts


def test_the_boundary_measures_its_parameter_list_once(measured):
    model = make_model(layers=5)
    boundary = Boundary(gk.Tracker(every=1, detail_every=1))
    fit(boundary, model, 5)
    assert len(boundary.tracker.history) == 5
    assert measured == [10]


def test_track_measures_its_parameter_list_once(measured):
    model, tracker = make_model(layers=5), gk.Tracker(every=1, detail_every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(5):
        model(torch.randn(3, 4, dtype=torch.float64)).square().mean().backward()
        tracker.track(model)
        opt.step()
        tracker.after_step()
        opt.zero_grad()
    tracker.close()
    assert len(tracker.history) == 5
    assert measured == [10]


def test_a_model_converted_in_place_between_trainings_or_tracked_steps_is_grouped_anew():
    # model.double() (or .cuda(), a trainer's .cpu()) keeps the parameter objects: the same parameters, whose
    # gradients now have another dtype. The boundary and track() must measure them as they are.
    def reference(model):
        return float(torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in model.parameters()])))

    for via_track in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        boundary, tracker = Boundary(gk.Tracker(every=1), gk.ClipByGlobalNorm(1e3)), gk.Tracker(every=1)
        seen, expected = [], []
        for dtype in (torch.float32, torch.float64):
            model.to(dtype)
            if not via_track:
                boundary.attach(model)
            for step in (1, 2):
                model(torch.randn(3, 4, dtype=dtype)).square().mean().backward()
                expected.append(reference(model))
                if via_track:
                    tracker.track(model)
                    tracker.after_step()
                else:
                    seen.append(float(boundary.before_step(step=step, micro_steps=1, items=1).total_norm))
                    boundary.after_step()
                model.zero_grad()
        if via_track:
            tracker.flush()
            seen = [record["global"]["norm_pre_clip"] for record in tracker.history]
        assert seen == pytest.approx(expected, rel=1e-6), via_track


def test_trainer_scalars_come_from_every_new_record_with_a_bounded_history():
    # Tracker(history=2) keeps two records in memory: the trainer's log scalars must not stop at the third step.
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    boundary = Boundary(gk.Tracker(every=1, history=2))
    boundary.attach(model)
    fresh = []
    for step in range(1, 6):
        model(torch.randn(3, 4)).square().mean().backward()
        boundary.before_step(step=step, micro_steps=1, items=1)
        boundary.after_step()
        model.zero_grad()
        boundary.tracker.flush()
        fresh.append(bool(boundary.new_scalars()))
        fresh.append(bool(boundary.new_scalars()))  # nothing new since the call before
    assert fresh == [True, False] * 5
