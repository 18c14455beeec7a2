"""The step's host reads: none when a fused optimizer skips on the device, exactly one otherwise.

With a fused torch optimizer the pipeline hands the non-finite flag to the optimizer
(``optimizer.found_inf``) instead of reading it; these tests count every way a tensor's
value can reach the host over whole steps, and check that the device skip leaves the
optimizer exactly where the read-and-skip path leaves it.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import gradkit as gk
from gradkit import pipeline as pipeline_module
from host_reads import count_host_reads

ACCUMULATION = 2


def model_of(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def batches(steps: int, *, nan_at: int | None = None, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for micro in range(steps * ACCUMULATION):
        x = torch.randn(5, 6, generator=generator)
        if nan_at is not None and micro == nan_at * ACCUMULATION:
            x[0, 0] = float("nan")
        out.append((x, torch.randint(0, 3, (5,), generator=generator)))
    return out


CONFIGS = {
    "plain": dict(accumulation_steps=1),
    "accumulation": dict(accumulation_steps=ACCUMULATION),
    "clip": dict(accumulation_steps=ACCUMULATION, clip=gk.ClipByGlobalNorm(0.5)),
    "clip-layers": dict(accumulation_steps=ACCUMULATION, clip=[gk.ClipPerLayer(0.3), gk.ClipByValue(0.1)]),
    "scaler": dict(accumulation_steps=ACCUMULATION, scaler="scaler"),
    "average": dict(accumulation_steps=ACCUMULATION, average="average", clip=gk.ClipByGlobalNorm(0.5)),
}


def build(config: str, optimizer: str):
    model = model_of()
    kwargs = dict(CONFIGS[config])
    if kwargs.get("scaler"):
        kwargs["scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    if kwargs.get("average"):
        kwargs["average"] = gk.Average()
    pipe = gk.GradientPipeline(model, **kwargs)
    if optimizer == "fused-adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    elif optimizer == "fused-sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, fused=True)
    else:  # foreach SGD: itself free of host reads on CPU (foreach Adam reads each step count there)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, foreach=True)
    return model, pipe, opt


def run(model, pipe, opt, data, num_items=True) -> list:
    returned = []
    for x, y in data:
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum" if num_items else "mean")
        pipe.backward(loss, num_items=torch.tensor(y.numel()) if num_items else None)
        returned.append(pipe.step(opt))
    return returned


def reads_per_step(monkeypatch, config: str, optimizer: str, steps: int = 4) -> float:
    model, pipe, opt = build(config, optimizer)
    per_step = pipe.accumulation_steps
    run(model, pipe, opt, batches(1)[:per_step])  # the optimizer's first step creates its state (with a read)
    data = batches(steps)[: steps * per_step]
    counter = count_host_reads(monkeypatch)
    run(model, pipe, opt, data)
    monkeypatch.undo()
    return counter["n"] / steps


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("optimizer", ["fused-adamw", "fused-sgd"])
def test_a_fused_optimizer_steps_without_any_host_read(monkeypatch, config, optimizer):
    assert reads_per_step(monkeypatch, config, optimizer) == 0


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_any_other_optimizer_reads_exactly_once_per_step(monkeypatch, config):
    assert reads_per_step(monkeypatch, config, "foreach-sgd") == 1


def test_nonfinite_raise_and_stateful_clips_keep_the_one_read(monkeypatch):
    for kwargs in (dict(nonfinite="raise"), dict(clip=gk.AutoClip(percentile=50))):
        model = model_of()
        pipe = gk.GradientPipeline(model, **kwargs)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        run(model, pipe, opt, batches(1)[:1])
        counter = count_host_reads(monkeypatch)
        run(model, pipe, opt, batches(3)[:3])
        monkeypatch.undo()
        assert counter["n"] == 3, kwargs


@pytest.mark.parametrize("optimizer", ["fused-adamw", "fused-sgd"])
def test_a_device_skip_leaves_the_optimizer_where_the_read_skip_leaves_it(optimizer):
    """Same data with a NaN window: the fused run (skip on the device) and the same optimizer
    driven with the read (a foreach twin) end with equal weights and optimizer state."""
    data = batches(5, nan_at=2)
    model, pipe, opt = build("clip", optimizer)
    returned = run(model, pipe, opt, data)
    twin = model_of()
    twin_pipe = gk.GradientPipeline(twin, accumulation_steps=ACCUMULATION, clip=gk.ClipByGlobalNorm(0.5))
    twin_opt = (
        torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=True)
        if optimizer == "fused-adamw"
        else torch.optim.SGD(twin.parameters(), lr=1e-2, momentum=0.9, foreach=True)
    )
    twin_returned = run(twin, twin_pipe, twin_opt, data)
    assert twin_returned[2 * ACCUMULATION + 1] is False and returned[2 * ACCUMULATION + 1] is True
    assert pipe.skipped_steps == twin_pipe.skipped_steps == 1
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)
    for a, b in zip(model.parameters(), twin.parameters()):
        for key, value in opt.state[a].items():
            torch.testing.assert_close(value, twin_opt.state[b][key], check_dtype=False)


def test_a_skipped_device_step_reports_a_tensor_and_touches_no_weight():
    model, pipe, opt = build("accumulation", "fused-adamw")
    run(model, pipe, opt, batches(1))
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    assert run(model, pipe, opt, batches(1, nan_at=0)) == [False, True]
    assert isinstance(pipe.last.skipped, torch.Tensor) and bool(pipe.last.skipped)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(v, opt.state[model[0].weight][k]) for k, v in state.items())
    assert pipe.skipped_steps == 1 and pipe.state_dict()["skipped_steps"] == 1


def test_a_window_count_of_zero_skips_on_the_device():
    model, pipe, opt = build("plain", "fused-adamw")
    run(model, pipe, opt, batches(1)[:1])
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1)[0]
    pipe.backward(nn.functional.cross_entropy(model(x), y, reduction="sum"), num_items=torch.tensor(0))
    assert pipe.step(opt) is True and bool(pipe.last.skipped)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_fused_optimizer_on_a_device_that_cannot_skip_falls_back_with_one_note(monkeypatch, caplog):
    monkeypatch.setattr(pipeline_module, "FLAG_SKIP_DEVICES", ("cuda",))
    model, pipe, opt = build("plain", "fused-adamw")
    run(model, pipe, opt, batches(1)[:1])
    with caplog.at_level(logging.WARNING, logger="gradkit"):
        counter = count_host_reads(monkeypatch)
        returned = run(model, pipe, opt, batches(3, nan_at=1)[:3])
    assert counter["n"] == 3 and returned == [True, True, False]  # micro-step 2 holds the NaN
    notes = [r for r in caplog.records if "cannot skip a step on a device flag" in r.getMessage()]
    assert len(notes) == 1 and "cpu" in notes[0].getMessage()
