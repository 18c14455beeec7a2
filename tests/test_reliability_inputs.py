"""The bad-input catalogue: every public class and function of gradkit, called with invalid
values (hypothesis draws them), raises ValueError or TypeError whose message names the
parameter and says what to pass, and a failed call changes no state.

A public name added to gk.__all__ without a catalogue entry (or an explicit exemption with
a reason) fails `test_every_public_name_is_catalogued`."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradkit as gk
from reliability_helpers import differences

NAN, INF = float("nan"), float("inf")

# -- strategies of invalid values ---------------------------------------------------------

NOT_A_NUMBER = st.one_of(
    st.booleans(), st.text(max_size=4), st.none(), st.just([1.0]), st.just(object()), st.just(torch.tensor(1.0))
)
NON_INTEGRAL = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(2.0))  # 2.0 too: counts are ints
NAN_INF = st.sampled_from([NAN, INF, -INF])
HUGE_INT = st.integers(min_value=10**6, max_value=10**30)


def positive(allow_none: bool = False) -> st.SearchStrategy:
    """Bad values for a number > 0 (finite)."""
    bad = [st.floats(max_value=0.0), st.integers(max_value=0), NAN_INF, NOT_A_NUMBER]
    strategy = st.one_of(*bad)
    return strategy.filter(lambda v: v is not None) if allow_none else strategy


def in_range(low: float, high: float, *, low_open: bool = True, high_open: bool = False) -> st.SearchStrategy:
    """Bad values for a number in (low, high] (or the variants)."""
    below = st.floats(max_value=low, exclude_max=not low_open)
    above = st.floats(min_value=high, exclude_min=not high_open)
    return st.one_of(
        below, above, st.just(NAN), st.integers(min_value=int(math.floor(high)) + 1), HUGE_INT, NOT_A_NUMBER
    )


def count(minimum: int = 1) -> st.SearchStrategy:
    """Bad values for an integer >= minimum."""
    return st.one_of(st.integers(max_value=minimum - 1), NON_INTEGRAL, NOT_A_NUMBER)


def flag(allow_none: bool = False) -> st.SearchStrategy:
    """Bad values for True/False: strings, numbers, containers (which `bool()` would take)."""
    bad = st.one_of(st.text(max_size=4), st.integers(), st.floats(), st.just([]), st.just(object()))
    return bad if allow_none else st.one_of(bad, st.none())


NORM_TYPE = st.one_of(
    st.floats(max_value=0.0), st.just(NAN), st.booleans(), st.none(), st.just("two"), st.just(object())
)
NOT_A_TENSOR = st.one_of(
    st.none(), st.integers(), st.floats(), st.text(max_size=4), st.just([1.0, 2.0]), st.just(object())
)
BAD_TENSOR = st.one_of(
    NOT_A_TENSOR,
    st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool]).map(lambda dtype: torch.ones(4, dtype=dtype)),
)
BAD_DTYPE = st.one_of(
    st.sampled_from([torch.int32, torch.int64, torch.bool, torch.uint8]),
    st.just("float16"),
    st.just(float),
    st.integers(),
)
NOT_A_COMPRESSOR = st.one_of(st.text(max_size=4), st.integers(), st.just(object()), st.just(gk.ClipByValue(1.0)))
NOT_A_GROUP = st.one_of(st.text(max_size=4), st.integers(min_value=1), st.just(object()))
NOT_PARAMETERS = st.one_of(st.integers(), st.floats(), st.none(), st.just(object()), st.just([1, 2]), st.just(["w"]))
NOT_A_DICT_STATE = st.one_of(st.none(), st.integers(), st.text(max_size=4), st.just([("count", 1)]))

# -- fixtures for calls that need an object --------------------------------------------------


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def with_grads() -> list[nn.Parameter]:
    model = small_model()
    model(torch.ones(3, 4, dtype=torch.float64)).sum().backward()
    return list(model.parameters())


def grads_of(params) -> list[Any]:
    return [p.grad.clone() for p in params]


class Pipe:
    """A pipeline one micro-step into a window of 2, after one full step, with stateful parts."""

    def __init__(self) -> None:
        self.model = small_model()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.pipe = gk.GradientPipeline(
            self.model,
            accumulation_steps=2,
            average=gk.Average(gk.TopK(0.5)),
            clip=[gk.ZClip(warmup=1), gk.AutoClip(history=3)],
            tracker=gk.Tracker(None),
        )
        for k in range(3):
            self.pipe.backward(self.loss(k), num_items=3)
            self.pipe.step(self.opt)

    def loss(self, k: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(k)
        return ((self.model(torch.randn(3, 4, generator=g, dtype=torch.float64)) - 1) ** 2).sum()

    def state(self) -> dict[str, Any]:
        return {
            "pipe": self.pipe.state_dict(),
            "opt": self.opt.state_dict(),
            "params": [p.detach().clone() for p in self.model.parameters()],
        }


def trained(stage_factory: Callable[[], Any]) -> Any:
    """A stage (or compressor) with some state."""
    obj = stage_factory()
    if isinstance(obj, gk.Compressor):
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            x = torch.randn(6, 5, generator=g, dtype=torch.float64)
            obj.compress(x, key="w") if obj.keyed else obj.compress(x)
    else:
        for k in range(3):
            params = with_grads()
            for p in params:
                p.grad.mul_(k + 1)
            obj(params)
    return obj


def state_of(obj: Any) -> Any:
    return obj.state_dict()


def edited(state: dict[str, Any], path: tuple, value: Any) -> dict[str, Any]:
    """A copy of `state` with the entry at `path` replaced (or removed when value is DELETE)."""
    import copy

    out = copy.deepcopy(state)
    target = out
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return out


DELETE = object()

# -- the catalogue ------------------------------------------------------------------------------


@dataclass
class Case:
    owner: str  # the public name
    param: str  # the word the message must hold
    bad: st.SearchStrategy
    call: Callable[[Any, Any], Any]  # call(target, value)
    target: Callable[[], Any] = lambda: None  # what must not change
    state: Callable[[Any], Any] = lambda target: None

    @property
    def id(self) -> str:
        return f"{self.owner}-{self.param}-{self.call.__name__ if hasattr(self.call, '__name__') else ''}"


def ctor(owner: str, param: str, bad: st.SearchStrategy, **fixed: Any) -> Case:
    cls = getattr(gk, owner)
    positional = [
        name
        for name, p in inspect.signature(cls).parameters.items()
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY)
    ]

    def build(_target, value):
        kwargs = dict(fixed)
        kwargs[param] = value
        for name in positional:
            kwargs.setdefault(
                name,
                {
                    "density": 0.1,
                    "tau": 0.1,
                    "max_norm": 1.0,
                    "value": 1.0,
                    "period": 2,
                    "compressor": gk.TopK(0.1),
                    "model": small_model(),
                }[name],
            )
        return cls(**kwargs)

    build.__name__ = "init"
    return Case(owner, param, bad, build)


def method(
    owner: str,
    param: str,
    bad: st.SearchStrategy,
    factory: Callable[[], Any],
    name: str,
    call: Callable[[Any, Any], Any],
    state: Callable[[Any], Any] = state_of,
) -> Case:
    call.__name__ = name
    return Case(owner, param, bad, call, factory, state)


def compressor_cases(owner: str, factory: Callable[[], Any]) -> list[Case]:
    made = factory()
    keyed = made.keyed
    return [
        method(
            owner,
            "tensor",
            BAD_TENSOR,
            lambda: trained(factory),
            "compress",
            (lambda c, v: c.compress(v, key="w")) if keyed else (lambda c, v: c.compress(v)),
        ),
        method(
            owner,
            "payload",
            st.one_of(
                NOT_A_TENSOR,
                st.just(gk.FP16().compress(torch.ones(3)))
                if owner != "FP16"
                else st.just(gk.BF16().compress(torch.ones(3))),
            ),
            lambda: trained(factory),
            "decompress",
            lambda c, v: c.decompress(v),
        ),
        method(
            owner,
            "load_state_dict",
            NOT_A_DICT_STATE,
            lambda: trained(factory),
            "load_state_dict",
            lambda c, v: c.load_state_dict(v),
        ),
    ]


def state_cases(owner: str, factory: Callable[[], Any], edits: list[tuple[str, tuple, Any]]) -> list[Case]:
    """load_state_dict with one entry changed: the message names `word`, nothing changes."""
    cases = []
    for word, path, value in edits:
        strategy = st.just((path, value))

        def load(obj, edit):
            path_, value_ = edit
            obj.load_state_dict(edited(obj.state_dict(), path_, value_))

        cases.append(method(owner, word, strategy, lambda factory=factory: trained(factory), "load_state_dict", load))
    return cases


CASES: list[Case] = [
    # compressors
    ctor("TopK", "density", in_range(0, 1)),
    ctor("TopK", "exact", flag()),
    ctor("TopK", "value_dtype", BAD_DTYPE),
    *compressor_cases("TopK", lambda: gk.TopK(0.3)),
    ctor("RandomK", "density", in_range(0, 1)),
    ctor("RandomK", "seed", count(0)),
    ctor("RandomK", "scale", flag()),
    *compressor_cases("RandomK", lambda: gk.RandomK(0.3)),
    *state_cases(
        "RandomK",
        lambda: gk.RandomK(0.3),
        [("step", ("step",), -1), ("step", ("step",), "3"), ("missing keys", ("step",), DELETE)],
    ),
    ctor("Threshold", "tau", positive()),
    ctor("Threshold", "value_dtype", BAD_DTYPE),
    *compressor_cases("Threshold", lambda: gk.Threshold(0.5)),
    ctor("DGC", "density", in_range(0, 1)),
    ctor(
        "DGC",
        "momentum",
        in_range(0, 1, low_open=False, high_open=False).filter(
            lambda v: not (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0)
        ),
    ),
    ctor("DGC", "clip_norm", positive(allow_none=True)),
    ctor("DGC", "warmup_steps", count(0)),
    ctor("DGC", "value_dtype", BAD_DTYPE),
    *compressor_cases("DGC", lambda: gk.DGC(0.3)),
    *state_cases(
        "DGC",
        lambda: gk.DGC(0.3),
        [("steps", ("steps", "w"), -2), ("steps", ("steps", "w"), True), ("velocity", ("velocity", "w"), [1.0])],
    ),
    ctor("QSGD", "levels", st.one_of(count(1), st.integers(min_value=128))),
    ctor("QSGD", "block", count(1)),
    ctor("QSGD", "seed", st.one_of(st.integers(max_value=-1), NON_INTEGRAL, st.booleans(), st.text(max_size=3))),
    *compressor_cases("QSGD", lambda: gk.QSGD(4, seed=1)),
    *state_cases(
        "QSGD",
        lambda: gk.QSGD(4, seed=1),
        [("generator", ("generator",), torch.zeros(3, dtype=torch.uint8)), ("generator", ("generator",), 5)],
    ),
    *compressor_cases("SignSGD", gk.SignSGD),
    *compressor_cases("FP16", gk.FP16),
    *compressor_cases("BF16", gk.BF16),
    ctor("PowerSGD", "rank", count(1)),
    ctor("PowerSGD", "warm_start", flag()),
    ctor("PowerSGD", "seed", count(0)),
    *compressor_cases("PowerSGD", lambda: gk.PowerSGD(1)),
    *state_cases(
        "PowerSGD",
        lambda: gk.PowerSGD(1),
        [("'q'", ("q", "w"), torch.zeros(5, 3)), ("residuals", ("residuals", "w"), "x"), ("keys", ("q",), DELETE)],
    ),
    ctor("ErrorFeedback", "compressor", st.one_of(NOT_A_COMPRESSOR, st.just(gk.ErrorFeedback(gk.TopK(0.1))))),
    *compressor_cases("ErrorFeedback", lambda: gk.ErrorFeedback(gk.TopK(0.3))),
    method(
        "ErrorFeedback",
        "key",
        st.one_of(st.integers(), st.just(object()), st.just([("w", (3,))])),
        lambda: trained(lambda: gk.ErrorFeedback(gk.TopK(0.3))),
        "compress-key",
        lambda c, v: c.compress(torch.ones(30, dtype=torch.float64), key=v),
    ),
    *state_cases(
        "ErrorFeedback",
        lambda: gk.ErrorFeedback(gk.TopK(0.3)),
        [("residuals", ("residuals", "w"), 3.0), ("unexpected keys", ("compressor",), {"x": 1})],
    ),
    # clipping
    ctor("ClipByGlobalNorm", "max_norm", positive()),
    ctor("ClipByGlobalNorm", "norm_type", NORM_TYPE),
    ctor("ClipByGlobalNorm", "group", NOT_A_GROUP),
    ctor("ClipByValue", "value", positive()),
    ctor("ClipPerLayer", "max_norm", positive()),
    ctor("AGC", "clip", positive()),
    ctor("AGC", "eps", positive()),
    ctor(
        "AGC",
        "exclude",
        st.one_of(st.text(min_size=1, max_size=4), st.integers(), st.none(), st.just([1, 2]), st.just([None])),
    ),
    ctor("AutoClip", "percentile", in_range(0, 100)),
    ctor("AutoClip", "history", count(1)),
    *state_cases(
        "AutoClip",
        lambda: gk.AutoClip(history=3),
        [
            ("norms", ("norms",), torch.zeros(4)),
            ("norms", ("norms",), [0.0] * 3),
            ("count", ("count",), -1),
            ("count", ("count",), 1.5),
        ],
    ),
    ctor("ZClip", "alpha", in_range(0, 1, high_open=True)),
    ctor("ZClip", "z_thresh", positive()),
    ctor("ZClip", "warmup", count(1)),
    ctor("ZClip", "eps", positive()),
    *state_cases(
        "ZClip",
        lambda: gk.ZClip(warmup=2),
        [
            ("warmup_norms", ("warmup_norms",), torch.zeros(3)),
            ("mean", ("mean",), torch.zeros(2)),
            ("var", ("var",), 1.0),
            ("count", ("count",), None),
        ],
    ),
    method(
        "ClipStage",
        "load_state_dict",
        NOT_A_DICT_STATE,
        lambda: trained(lambda: gk.ZClip(warmup=2)),
        "load_state_dict",
        lambda s, v: s.load_state_dict(v),
    ),
    *[
        method(name, param, strategy, with_grads, "call", call, grads_of)
        for name, param, strategy, call in [
            ("clip_grad_norm_", "parameters", NOT_PARAMETERS, lambda ps, v: gk.clip_grad_norm_(v, 1.0)),
            ("clip_grad_norm_", "max_norm", positive(), lambda ps, v: gk.clip_grad_norm_(ps, v)),
            ("clip_grad_norm_", "norm_type", NORM_TYPE, lambda ps, v: gk.clip_grad_norm_(ps, 0.01, v)),
            ("clip_grad_norm_", "group", NOT_A_GROUP, lambda ps, v: gk.clip_grad_norm_(ps, 0.01, group=v)),
            (
                "clip_grad_norm_",
                "error_if_nonfinite",
                flag(),
                lambda ps, v: gk.clip_grad_norm_(ps, 0.01, error_if_nonfinite=v),
            ),
            ("clip_grad_value_", "parameters", NOT_PARAMETERS, lambda ps, v: gk.clip_grad_value_(v, 0.01)),
            ("clip_grad_value_", "clip_value", positive(), lambda ps, v: gk.clip_grad_value_(ps, v)),
            ("grad_norms", "parameters", NOT_PARAMETERS, lambda ps, v: gk.grad_norms(v)),
            ("grad_norms", "norm_type", NORM_TYPE, lambda ps, v: gk.grad_norms(ps, v)),
        ]
    ],
    # averaging
    ctor("Average", "compressor", NOT_A_COMPRESSOR),
    ctor("Average", "error_feedback", flag(allow_none=True), compressor=gk.TopK(0.1)),
    ctor("Average", "bucket_mb", positive()),
    ctor("Average", "first_bucket_mb", positive()),
    ctor("Average", "timeout", positive(allow_none=True)),
    ctor("Average", "group", NOT_A_GROUP),
    ctor("Average", "node_size", count(1).filter(lambda v: v is not None)),
    ctor("ModelAverager", "period", count(1)),
    ctor("ModelAverager", "warmup_steps", count(0)),
    ctor("ModelAverager", "timeout", positive(allow_none=True)),
    ctor("ModelAverager", "group", NOT_A_GROUP),
    method(
        "ModelAverager",
        "step",
        st.one_of(st.integers(max_value=-1), NON_INTEGRAL, NOT_A_NUMBER),
        lambda: gk.ModelAverager(2),
        "load_state_dict",
        lambda m, v: m.load_state_dict({"step": v}),
    ),
    ctor("ddp_comm_hook", "compressor", NOT_A_COMPRESSOR),
    ctor("ddp_comm_hook", "error_feedback", flag(allow_none=True), compressor=gk.TopK(0.1)),
    ctor("ddp_comm_hook", "timeout", positive(allow_none=True)),
    ctor("ddp_comm_hook", "model", st.one_of(st.integers(), st.text(max_size=3), st.just(object()))),
    ctor("ddp_comm_hook", "group", NOT_A_GROUP),
    ctor("ddp_comm_hook", "node_size", count(1).filter(lambda v: v is not None)),
    # tracking
    ctor("Tracker", "every", count(1)),
    ctor("Tracker", "detail_every", count(1).filter(lambda v: v is not None)),
    ctor("Tracker", "writers", st.one_of(st.just(("csv",)), st.integers(), st.none(), st.just(["jsonl", "wandb"]))),
    ctor("Tracker", "alerts", st.one_of(st.integers(), st.text(max_size=3), st.just({"patience": 3}))),
    ctor("Tracker", "noise_beta", in_range(0, 1, low_open=False, high_open=True)),
    ctor("Tracker", "histogram_bins", count(1)),
    ctor("Tracker", "update_ratio", flag()),
    ctor("Tracker", "gather", flag()),
    ctor("Tracker", "timeout", positive(allow_none=True)),
    ctor(
        "Tracker",
        "meta",
        st.one_of(st.integers(), st.text(min_size=1, max_size=3), st.just({"x": object()}), st.just({"x": NAN})),
    ),
    ctor("Tracker", "log_dir", st.one_of(st.integers(), st.just(object()), st.just(["runs"]))),
    # the pipeline and its context
    ctor(
        "GradientPipeline",
        "model",
        st.one_of(st.integers(), st.none(), st.just(torch.zeros(2, requires_grad=True)), st.just([1, 2]), st.just([])),
    ),
    ctor("GradientPipeline", "accumulation_steps", count(1)),
    ctor(
        "GradientPipeline",
        "average",
        st.one_of(st.integers(min_value=1), st.text(min_size=1, max_size=3), st.just(gk.TopK(0.1))),
    ),
    ctor(
        "GradientPipeline",
        "clip",
        st.one_of(st.text(min_size=1, max_size=3), st.integers(), st.just([gk.ClipByValue(1.0), 3])),
    ),
    ctor("GradientPipeline", "tracker", st.one_of(st.integers(), st.text(min_size=1, max_size=3), st.just(object()))),
    ctor("GradientPipeline", "ema", st.one_of(st.floats(), st.text(min_size=1, max_size=3), st.just(object()))),
    ctor("FSDPSync", "model", st.one_of(st.integers(), st.none(), st.just(nn.Linear(2, 2)))),
    ctor("EMA", "model", st.one_of(st.integers(), st.none(), st.just([nn.Parameter(torch.zeros(2))]))),
    ctor("EMA", "decay", in_range(0.0, 1.0, high_open=True)),
    ctor("EMA", "warmup", flag()),
    ctor("EMA", "every", count(1)),
    ctor("EMA", "buffers", st.one_of(st.text(max_size=4), st.integers(), st.none())),
    method(
        "EMA",
        "updates",
        st.one_of(st.integers(max_value=-1), NON_INTEGRAL, NOT_A_NUMBER),
        lambda: gk.EMA(small_model()),
        "load_state_dict",
        lambda e, v: e.load_state_dict({**e.state_dict(), "updates": v}),
    ),
    ctor("GradientPipeline", "scaler", st.one_of(st.integers(), st.text(min_size=1, max_size=3), st.just(object()))),
    ctor(
        "GradientPipeline",
        "nonfinite",
        st.one_of(st.text(max_size=6).filter(lambda s: s not in ("skip", "raise")), st.integers(), st.booleans()),
    ),
    method(
        "GradientPipeline",
        "num_items",
        st.one_of(
            st.integers(max_value=0),
            NON_INTEGRAL,
            st.booleans(),
            st.text(max_size=3),
            st.just(torch.tensor([3, 4])),
            st.just(torch.tensor(2.5)),
            st.just(torch.tensor(3, device="meta")),
        ),
        Pipe,
        "backward",
        lambda p, v: p.pipe.backward(p.loss(), num_items=v),
        lambda p: p.state(),
    ),
    method(
        "GradientPipeline",
        "loss",
        st.one_of(NOT_A_TENSOR, st.just(torch.ones(3, requires_grad=True)), st.just(torch.tensor(1.0))),
        Pipe,
        "backward-loss",
        lambda p, v: p.pipe.backward(v),
        lambda p: p.state(),
    ),
    method(
        "GradientPipeline",
        "optimizer",
        st.one_of(NOT_A_TENSOR, st.just(nn.Linear(2, 2))),
        Pipe,
        "flush",
        lambda p, v: p.pipe.flush(v),
        lambda p: p.state(),
    ),
    method(
        "GradientPipeline",
        "optimizer",
        st.one_of(NOT_A_TENSOR, st.just(nn.Linear(2, 2))),
        Pipe,
        "step",
        lambda p, v: p.pipe.step(v),
        lambda p: p.state(),
    ),
    *[
        method(
            "GradientPipeline",
            word,
            st.just((path, value)),
            Pipe,
            "load_state_dict",
            lambda p, edit: p.pipe.load_state_dict(edited(p.pipe.state_dict(), *edit)),
            lambda p: p.state(),
        )
        for word, path, value in [
            ("missing keys", ("tracker",), DELETE),
            ("unexpected keys", ("extra",), 1),
            ("steps", ("steps",), "4"),
            ("steps", ("steps",), -1),
            ("skipped_steps", ("skipped_steps",), 1.5),
            ("micro_steps", ("micro_steps",), 2),
            ("items", ("items",), -3),
            ("items", ("items",), torch.tensor(2.5)),
            ("unknown parameter", ("grads", "9.weight"), torch.zeros(2)),
            ("has shape", ("grads", "0.weight"), torch.zeros(4, 4)),
            ("clip stage states", ("clip",), [{}]),
            ("count", ("clip", 1, "count"), -1),
            ("norms", ("clip", 1, "norms"), torch.zeros(7)),
            ("ErrorFeedback", ("average", "compressor"), {}),
            ("Tracker", ("tracker", "step"), "x"),
        ]
    ],
    method(
        "GradContext",
        "names",
        st.one_of(st.just(["a"]), st.just([1, 2, 3, 4]), st.just(["a"] * 9)),
        with_grads,
        "init",
        lambda ps, v: gk.GradContext(v, ps),
        grads_of,
    ),
    method(
        "GradContext",
        "params",
        st.one_of(st.just([1, 2, 3, 4]), st.just([None] * 4)),
        with_grads,
        "init-params",
        lambda ps, v: gk.GradContext(["a", "b", "c", "d"], v),
        grads_of,
    ),
]


def duplicated_parameters() -> list[Any]:
    params = list(small_model().parameters())
    return params + params[:1]


def duplicated_names() -> list[tuple[str, nn.Parameter]]:
    return [("w", p) for p in small_model().parameters()]


def attached_average() -> gk.Average:
    average = gk.Average(gk.TopK(0.5))
    gk.GradientPipeline(small_model(), average=average)
    return average


def stage_twice() -> list[gk.ClipStage]:
    stage = gk.AutoClip(history=3)
    return [stage, stage]


# Mistakes found by an audit of the public API (one row per fixed case).
CASES += [
    ctor("GradientPipeline", "model", st.one_of(st.builds(duplicated_parameters), st.builds(duplicated_names))),
    ctor("GradientPipeline", "clip", st.builds(stage_twice)),
    ctor("GradientPipeline", "average", st.builds(attached_average)),
    ctor("GradientPipeline", "tracker", st.just(gk.Tracker)),
    ctor("GradientPipeline", "scaler", st.just(torch.amp.GradScaler)),
    ctor("GradientPipeline", "ema", st.one_of(st.just(gk.EMA), st.builds(lambda: gk.EMA(small_model())))),
    *[
        method(
            "GradientPipeline",
            "optimizer",
            st.builds(lambda: torch.optim.SGD(small_model().parameters(), lr=0.1)),  # another model's
            Pipe,
            name,
            call,
            lambda p: p.state(),
        )
        for name, call in [("step-other", lambda p, v: p.pipe.step(v)), ("flush-other", lambda p, v: p.pipe.flush(v))]
    ],
    method(
        "GradientPipeline",
        "residuals",
        st.just((("average", "compressor", "residuals", "0.weight"), torch.zeros(7, dtype=torch.float64))),
        Pipe,
        "load_state_dict-size",
        lambda p, edit: p.pipe.load_state_dict(edited(p.pipe.state_dict(), *edit)),
        lambda p: p.state(),
    ),
    *[
        method(
            owner, word, st.builds(lambda make=other: make().compress(torch.ones(30))), ours, "decompress-other", call
        )
        for owner, word, other, ours in [
            ("QSGD", "levels", lambda: gk.QSGD(16, seed=1), lambda: trained(lambda: gk.QSGD(4, seed=1))),
            ("QSGD", "block", lambda: gk.QSGD(4, block=8, seed=1), lambda: trained(lambda: gk.QSGD(4, seed=1))),
            ("RandomK", "density", lambda: gk.RandomK(0.5), lambda: trained(lambda: gk.RandomK(0.3))),
            ("RandomK", "seed", lambda: gk.RandomK(0.3, seed=5), lambda: trained(lambda: gk.RandomK(0.3))),
        ]
        for call in [lambda c, v: c.decompress(v)]
    ],
    ctor("EMA", "model", st.builds(nn.Sequential)),
]

EXEMPT = {
    "Compressor": (
        "abstract base with no arguments; "
        "every concrete compressor is catalogued (compress, decompress, load_state_dict)"
    ),
    "Payload": "a record that compress() makes; decompress() checks it, catalogued under each compressor's 'payload'",
    "StepReport": "a record the pipeline makes for the user to read; users never build one",
    "CollectiveError": "an exception class, raised by gradkit",
    "__version__": "a string, not callable",
}

FIX_WORDS = ("pass", "use", "e.g.", "build", "wrap", "call", "must", "expects", "leave", "choose", "load")


def test_every_public_name_is_catalogued():
    covered = {case.owner for case in CASES}
    for name in gk.__all__:
        obj = getattr(gk, name)
        if name in EXEMPT:
            continue
        assert inspect.isclass(obj) or inspect.isfunction(obj), (
            f"{name}: neither class nor function; exempt it with a reason"
        )
        assert name in covered, (
            f"gk.{name} has no bad-input catalogue entry (add one to CASES, or to EXEMPT with a reason)"
        )
    assert not set(EXEMPT) - set(gk.__all__), "EXEMPT lists names that are no longer public"


@pytest.mark.parametrize("case", CASES, ids=[f"{c.owner}-{c.param}-{getattr(c.call, '__name__', '')}" for c in CASES])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_bad_input_is_rejected_by_name_and_changes_nothing(case, data):
    value = data.draw(case.bad, label=case.param)
    target = case.target()
    before = case.state(target)
    with pytest.raises((ValueError, TypeError)) as raised:
        case.call(target, value)
    message = str(raised.value)
    assert case.param.lower() in message.lower(), (
        f"{type(raised.value).__name__} does not name {case.param!r}: {message}"
    )
    assert any(word in message for word in FIX_WORDS), f"no fix in: {message}"
    assert differences(before, case.state(target)) == [], "a failed call changed state"
