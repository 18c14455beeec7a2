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


class _OneModuleAtATime:
    """The rules as plainly written, one module at a time: the reference for the columnar `check_columns`."""

    def __init__(self, rules):
        self.r, self.state, self.active = rules, {}, set()

    def check(self, step, norms, global_norm):
        import math
        import statistics

        r, out = self.r, []
        finite = [n for n in norms.values() if n is not None and math.isfinite(n) and n > 0]
        median = statistics.median(finite) if finite else 0.0
        for name, norm in list(norms.items()) + [("(global)", global_norm)]:
            if norm is None or not math.isfinite(norm):
                continue
            s = self.state.setdefault(name, {"ema": 0.0, "seen": 0, "vanish": 0, "dead": 0})
            conditions = []
            if name != "(global)":
                dead = norm == 0.0
                s["dead"] = s["dead"] + 1 if dead else 0
                low = not dead and (norm < r.vanish_abs or norm < r.vanish_ratio * median)
                s["vanish"] = s["vanish"] + 1 if low else 0
                conditions += [("dead", s["dead"] >= r.patience), ("vanishing", s["vanish"] >= r.patience)]
            conditions.append(("exploding", s["seen"] >= r.warmup and norm > r.explode_factor * s["ema"] > 0))
            for kind, on in conditions:
                if not on:
                    self.active.discard((kind, name))
                elif (kind, name) not in self.active:
                    self.active.add((kind, name))
                    out.append((step, kind, name, norm))
            s["ema"] = norm if s["seen"] == 0 else r.explode_beta * s["ema"] + (1 - r.explode_beta) * norm
            s["seen"] += 1
        return out


def test_columnar_rules_fire_as_the_rules_read_one_module_at_a_time():
    import random

    rng = random.Random(0)
    rules, reference = AlertRules(patience=2, warmup=2), _OneModuleAtATime(AlertRules(patience=2, warmup=2))
    names, fired = [f"m{i}" for i in range(12)], set()
    for step in range(1, 80):
        if step == 40:
            names = names[3:] + ["new"]  # the module list changes: state follows the names
        norms = {}
        for name in names:
            kind = rng.random()
            norms[name] = (
                None if kind < 0.05 else 0.0 if kind < 0.2 else 1e-12 if kind < 0.35 else 1e3 if kind < 0.45 else
                rng.uniform(0.5, 2.0)
            )  # fmt: skip
        global_norm = rng.choice([1.0, 1.2, 50.0, float("nan")])
        got = [(a.step, a.kind, a.name, a.value) for a in rules.check(step, norms, global_norm)]
        assert got == reference.check(step, norms, global_norm)
        if step in (30, 60):
            assert rules.state_dict()["modules"] == reference.state
            restored = AlertRules(patience=2, warmup=2)
            restored.load_state_dict(rules.state_dict())
            rules = restored
        fired |= {kind for _, kind, _, _ in got}
    assert fired == {"dead", "vanishing", "exploding"}  # every rule was exercised


def test_norms_as_an_array_with_nan_fire_as_the_list_with_none():
    import math

    import numpy as np

    names = [f"m{i}" for i in range(6)]
    by_list, by_array = AlertRules(patience=1, warmup=1), AlertRules(patience=1, warmup=1)
    for step, norms in enumerate([[1.0, 0.0, None, 1e-12, 1.0, 2.0], [1.0, 0.0, 3.0, 1e-12, 50.0, None]], start=1):
        array = np.array([math.nan if n is None else n for n in norms])
        got = by_array.check_columns(step, names, array, 1.0)
        assert got == by_list.check_columns(step, names, norms, 1.0)
        assert all(type(a.value) is float for a in got) and got
    assert by_array.state_dict() == by_list.state_dict()
