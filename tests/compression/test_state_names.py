"""Compressor state is saved by parameter name: it loads only where the names match.

A checkpoint loaded into a model whose parameters are named otherwise (the model
wrapped in nn.Sequential) is refused, naming the first mismatch; names of a
compiled model are those of the eager one, so either state loads into the other.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradkit as gk
from gradkit import _names
from gradkit.integrations.ddp import CommHookState

F64 = torch.float64


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)


def train(pipe: gk.GradientPipeline, model: nn.Module, opt: torch.optim.Optimizer, seeds: range) -> None:
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(8, 6, generator=gen, dtype=F64)
        pipe.backward(model(x).pow(2).sum(), num_items=8)
        assert pipe.step(opt)


def snapshot(pipe: gk.GradientPipeline, model: nn.Module) -> tuple[dict, list[torch.Tensor]]:
    return pipe.state_dict(), [p.detach().clone() for p in model.parameters()]


def assert_state_equal(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            assert_state_equal(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("make", [lambda: gk.TopK(0.1), lambda: gk.DGC(0.2), lambda: gk.PowerSGD(1)])
def test_state_saved_under_other_names_is_refused_and_changes_nothing(make):
    model = make_model()
    pipe = gk.GradientPipeline(model, average=gk.Average(make()))
    train(pipe, model, torch.optim.SGD(model.parameters(), lr=0.1), range(2))
    saved = pipe.state_dict()
    assert any(saved["average"]["compressor"].values())  # there is named state to refuse

    wrapped = nn.Sequential(make_model())  # the same model, its names now prefixed with "0."
    other = gk.GradientPipeline(wrapped, average=gk.Average(make()))
    train(other, wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), range(1))
    before = other.state_dict()
    with pytest.raises(ValueError, match=r"parameter '0\.weight'.*does not have.*'0\.0\.weight'") as error:
        other.load_state_dict(saved)
    assert "the names it was saved with" in str(error.value)
    assert_state_equal(other.state_dict(), before)


def test_topk_state_of_a_sequential_wrapped_model_is_refused():
    # The case: Average(TopK(0.1)) saved, then loaded into nn.Sequential(model).
    model = make_model()
    pipe = gk.GradientPipeline(model, average=gk.Average(gk.TopK(0.1)))
    train(pipe, model, torch.optim.SGD(model.parameters(), lr=0.1), range(3))
    saved = pipe.state_dict()
    wrapped = nn.Sequential(model)
    with pytest.raises(ValueError, match="Average.load_state_dict"):
        gk.GradientPipeline(wrapped, average=gk.Average(gk.TopK(0.1))).load_state_dict(saved)


def test_missing_and_unknown_names_are_refused_by_the_ddp_hook_state():
    names = {1: "w", 2: "b"}
    state = CommHookState(gk.ErrorFeedback(gk.TopK(0.5)), None, names, None, ("w", "b"))
    with pytest.raises(ValueError, match=r"no 'residuals' for parameter 'b'"):
        state.load_state_dict({"compressor": {"residuals": {"w": torch.ones(3)}, "compressor": {}}})
    with pytest.raises(ValueError, match=r"'residuals' for parameter 'x'"):
        state.load_state_dict({"compressor": {"residuals": {"w": torch.ones(3), "x": torch.ones(3)}, "compressor": {}}})
    assert state.state_dict()["compressor"]["residuals"] == {}
    state.load_state_dict({"compressor": {"residuals": {}, "compressor": {}}})  # nothing yet: nothing missing
    state.load_state_dict({"compressor": {"residuals": {"w": torch.ones(3), "b": torch.ones(2)}, "compressor": {}}})
    assert set(state.state_dict()["compressor"]["residuals"]) == {"w", "b"}


@pytest.mark.parametrize(
    "compressor, state, message",
    [
        (
            gk.DGC(0.5),
            {"momentum": {"w": torch.ones(2)}, "velocity": {"w": torch.ones(2)}, "steps": {"v": 1}},
            "'steps' for parameter 'v'",
        ),
        (
            gk.DGC(0.5),
            {"momentum": {"w": torch.ones(2)}, "velocity": {"w": torch.ones(2)}, "steps": {}},
            "no 'momentum' for parameter 'b'",
        ),
        (
            gk.PowerSGD(1),
            {"residuals": {"w": torch.ones(2), "b": torch.ones(2)}, "q": {"v": torch.ones(2, 1)}},
            "'q' for parameter 'v'",
        ),
        (gk.PowerSGD(1), {"residuals": {"b": torch.ones(2)}, "q": {}}, "no 'residuals' for parameter 'w'"),
    ],
)
def test_every_named_part_of_a_compressor_state_is_checked(compressor, state, message):
    with pytest.raises(ValueError, match=message):
        compressor.check_state_names("Owner", state, {"w", "b"}, ["w", "b"])
    # Parts that need not name every parameter (DGC's step counts, PowerSGD's Q) may name fewer.
    compressor.check_state_names(
        "Owner",
        {**state, "steps": {}, "q": {}, "momentum": {}, "velocity": {}, "residuals": {}},
        {"w", "b"},
        ["w", "b"],
    )


def test_compiled_submodule_names_are_bare():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = torch.compile(nn.Linear(3, 2), backend="eager")
            self.head = nn.Linear(2, 1)

    net = Net()
    assert [name for name, _ in net.named_parameters()][0] == "block._orig_mod.weight"
    assert [name for name, _ in _names.named_parameters(net)] == [
        "block.weight",
        "block.bias",
        "head.weight",
        "head.bias",
    ]
    assert [name for name, _ in _names.named_parameters(torch.compile(net, backend="eager"))] == [
        "block.weight",
        "block.bias",
        "head.weight",
        "head.bias",
    ]
    assert _names.bare_name("a._orig_mod_x.w") == "a._orig_mod_x.w"  # only the whole part is dropped


@pytest.mark.parametrize("saved_compiled", [True, False])
def test_compiled_and_eager_state_are_interchangeable(saved_compiled):
    def pipeline(compiled: bool):
        model = make_model()
        run = torch.compile(model, backend="eager") if compiled else model
        pipe = gk.GradientPipeline(run, average=gk.Average(gk.TopK(0.3)))
        return pipe, run, model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    # Uninterrupted, eager: the reference.
    pipe, run, model, opt = pipeline(False)
    train(pipe, run, opt, range(4))
    reference = [p.detach().clone() for p in model.parameters()]

    pipe, run, model, opt = pipeline(saved_compiled)
    assert pipe.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    train(pipe, run, opt, range(2))
    saved, weights, opt_state = pipe.state_dict(), [p.detach().clone() for p in model.parameters()], opt.state_dict()
    assert set(saved["average"]["compressor"]["residuals"]) == set(pipe.names)

    pipe, run, model, opt = pipeline(not saved_compiled)
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    opt.load_state_dict(opt_state)
    pipe.load_state_dict(saved)
    train(pipe, run, opt, range(2, 4))
    for p, r in zip(model.parameters(), reference):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-12)
