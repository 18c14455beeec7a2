"""Alerts fire on purpose-built models, name the right layer, and stay silent on a healthy one."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import gradkit as gk
from gradkit.tracking import AlertRules


def data(count, d_in=8, d_out=2, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, d_in, generator=g), torch.randn(size, d_out, generator=g)) for _ in range(count)]


def train(pipe, model, opt, batches, before_step=None):
    for x, y in batches:
        if before_step is not None:
            before_step(pipe.steps + 1)
        pipe.backward(((model(x) - y) ** 2).mean())
        pipe.step(opt)


def kinds(tracker):
    return {(a.kind, a.name) for a in tracker.alerts}


def test_healthy_model_is_silent(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    tracker = gk.Tracker(every=1)
    pipe = gk.GradientPipeline(model, clip=gk.ClipByGlobalNorm(5.0), tracker=tracker)
    with caplog.at_level(logging.WARNING, logger="gradkit.tracking"):
        train(pipe, model, torch.optim.Adam(model.parameters(), lr=1e-3), data(40))
    assert tracker.alerts == [] and tracker.last_alerts == []
    assert not [r for r in caplog.records if r.name == "gradkit.tracking"]


def test_deep_sigmoid_stack_alerts_vanishing_in_the_first_layers():
    torch.manual_seed(0)
    layers = []
    for _ in range(12):
        layers += [nn.Linear(8, 8), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(8, 2))
    tracker = gk.Tracker(every=1, alerts=AlertRules(patience=3))
    pipe = gk.GradientPipeline(model, tracker=tracker)
    train(pipe, model, torch.optim.SGD(model.parameters(), lr=1e-3), data(5))
    vanishing = {a.name: a for a in tracker.alerts if a.kind == "vanishing"}
    assert "0" in vanishing and "24" not in vanishing  # the first layer, not the head
    assert vanishing["0"].step == 3  # after `patience` consecutive logged steps
    assert "'0'" in vanishing["0"].message


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.factor = 1.0

    def forward(self, x):
        return x * self.factor


def test_scaled_up_layer_alerts_exploding_at_the_jump():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), Scale(), nn.Linear(16, 2))
    tracker = gk.Tracker(every=1)
    pipe = gk.GradientPipeline(model, tracker=tracker)

    def blow_up(step):
        if step == 12:
            model[3].factor = 300.0

    train(pipe, model, torch.optim.SGD(model.parameters(), lr=1e-4), data(14), before_step=blow_up)
    exploding = [a for a in tracker.alerts if a.kind == "exploding"]
    assert exploding and {a.step for a in exploding} == {12}
    assert {"4", "(global)"} <= {a.name for a in exploding}


def test_dead_layer_alerts_after_patience():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), Scale(), nn.Linear(16, 2))
    model[1].factor = 0.0  # nothing flows back into layer 0
    tracker = gk.Tracker(every=1, alerts=AlertRules(patience=2))
    pipe = gk.GradientPipeline(model, tracker=tracker)
    train(pipe, model, torch.optim.SGD(model.parameters(), lr=0.01), data(4))
    assert [(a.kind, a.name, a.step) for a in tracker.alerts] == [("dead", "0", 2)]


class NaNBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class Poison(nn.Module):
    """A layer whose backward emits NaN while `active`."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.active = False

    def forward(self, x):
        out = self.lin(x)
        return NaNBackward.apply(out) if self.active else out


def poisoned_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), Poison(), nn.ReLU(inplace=True), nn.Linear(16, 2))


def test_persistent_nan_is_located_by_hooks_on_the_next_step():
    model = poisoned_model()
    tracker = gk.Tracker(every=1)
    pipe = gk.GradientPipeline(model, accumulation_steps=2, tracker=tracker)
    train(pipe, model, torch.optim.SGD(model.parameters(), lr=0.01), data(4))
    model[2].active = True
    train(pipe, model, torch.optim.SGD(model.parameters(), lr=0.01), data(4, seed=2))
    nonfinite = [a for a in tracker.alerts if a.kind == "nonfinite"]
    assert [a.step for a in nonfinite] == [3, 4]
    assert nonfinite[0].name == "2.lin"  # the cheap guess from parameter order
    assert nonfinite[1].name == "2" and "located by hooks" in nonfinite[1].message  # the module that produced it
    assert pipe.skipped_steps == 2
    assert tracker._locator is not None and not tracker._locator.armed  # hooks removed after the check


def test_transient_nan_between_logs_is_reported_and_replay_names_the_module():
    model = poisoned_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = gk.Tracker(every=4)
    pipe = gk.GradientPipeline(model, tracker=tracker)
    batches = data(12)

    def poison_step_6(step):
        model[2].active = step == 6

    train(pipe, model, opt, batches[:9], before_step=poison_step_6)
    assert [(a.kind, a.name, a.step) for a in tracker.alerts] == [("nonfinite", "(global)", 8)]
    assert [r["step"] for r in tracker.history] == [1, 4, 8, 9]  # step 9 re-checked with hooks, found finite
    x, y = batches[0]
    assert tracker.locate_nonfinite(lambda: ((model(x) - y) ** 2).mean()) is None
    model[2].active = True
    assert tracker.locate_nonfinite(lambda: ((model(x) - y) ** 2).mean()) == "2"
    assert all(p.grad is None for p in model.parameters())  # the replay leaves p.grad alone
    assert tracker.alerts[-1].name == "2" and "replay" in tracker.alerts[-1].message


def test_nan_from_the_loss_is_named_as_such():
    model = poisoned_model()
    tracker = gk.Tracker(every=1)
    gk.GradientPipeline(model, tracker=tracker)
    x, y = data(1)[0]
    assert tracker.locate_nonfinite(lambda: ((model(x) - y) ** 2).mean() * float("nan")) == "(loss)"


@pytest.mark.parametrize("kwargs", [{"patience": 0}, {"explode_factor": 1.0}, {"vanish_ratio": 2.0}])
def test_bad_thresholds_are_rejected(kwargs):
    with pytest.raises(ValueError):
        AlertRules(**kwargs)
