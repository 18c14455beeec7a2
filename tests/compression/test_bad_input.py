"""Bad input is refused with an error that names the argument, and changes nothing."""

from __future__ import annotations

import re

import pytest
import torch

import gradkit as gk
from compression_cases import (
    ALL,
    BUCKET,
    assert_same_state,
    build,
    checkpoint_inputs,
    checkpointed,
    gaussian,
    inner,
    run_steps,
    stateful_after_steps,
)
from gradkit.compression.keyed_state import KeyedState

BAD_DENSITIES = [
    (0, ValueError),
    (0.0, ValueError),
    (-0.1, ValueError),
    (1.5, ValueError),
    (float("nan"), ValueError),
    ("0.1", TypeError),
    (None, TypeError),
    (True, TypeError),
]
BAD_CONFIGS = [
    *[
        (f"{cls.__name__}(density={d!r})", lambda cls=cls, d=d: cls(d), error, "density")
        for cls in (gk.TopK, gk.RandomK, gk.DGC)
        for d, error in BAD_DENSITIES
    ],
    ("QSGD(levels=0)", lambda: gk.QSGD(0), ValueError, "levels"),
    ("QSGD(levels=128)", lambda: gk.QSGD(128), ValueError, "levels"),
    ("QSGD(levels=2.5)", lambda: gk.QSGD(2.5), TypeError, "levels"),
    ("QSGD(block=0)", lambda: gk.QSGD(block=0), ValueError, "block"),
    ("PowerSGD(rank=0)", lambda: gk.PowerSGD(0), ValueError, "rank"),
    ("PowerSGD(rank=-1)", lambda: gk.PowerSGD(-1), ValueError, "rank"),
    ("PowerSGD(seed=-1)", lambda: gk.PowerSGD(1, seed=-1), ValueError, "seed"),
    ("Threshold(tau=0)", lambda: gk.Threshold(0), ValueError, "tau"),
    ("Threshold(tau=-1e-3)", lambda: gk.Threshold(-1e-3), ValueError, "tau"),
    ("Threshold(tau=nan)", lambda: gk.Threshold(float("nan")), ValueError, "tau"),
    ("Threshold(tau='1')", lambda: gk.Threshold("1"), TypeError, "tau"),
    ("DGC(momentum=1)", lambda: gk.DGC(0.01, 1.0), ValueError, "momentum"),
    ("DGC(momentum=-0.1)", lambda: gk.DGC(0.01, -0.1), ValueError, "momentum"),
    ("DGC(warmup_steps=-1)", lambda: gk.DGC(0.01, warmup_steps=-1), ValueError, "warmup_steps"),
    ("DGC(clip_norm=0)", lambda: gk.DGC(0.01, clip_norm=0.0), ValueError, "clip_norm"),
    ("RandomK(seed=-1)", lambda: gk.RandomK(0.1, seed=-1), ValueError, "seed"),
    *[
        (f"{name}(value_dtype=int8)", make, TypeError, "value_dtype")
        for name, make in [
            ("TopK", lambda: gk.TopK(0.1, value_dtype=torch.int8)),
            ("Threshold", lambda: gk.Threshold(0.1, value_dtype=torch.int8)),
            ("DGC", lambda: gk.DGC(0.1, value_dtype=torch.int8)),
            ("TopK", lambda: gk.TopK(0.1, value_dtype="float16")),
        ]
    ],
    ("ErrorFeedback(object)", lambda: gk.ErrorFeedback(object()), TypeError, "compressor"),
    ("ErrorFeedback(TopK class)", lambda: gk.ErrorFeedback(gk.TopK), TypeError, "compressor"),
    ("ErrorFeedback(ErrorFeedback)", lambda: gk.ErrorFeedback(gk.ErrorFeedback(gk.TopK(0.1))), TypeError, "compressor"),
    (
        "ErrorFeedback(residual_dtype=int8)",
        lambda: gk.ErrorFeedback(gk.TopK(0.1), residual_dtype=torch.int8),
        TypeError,
        "residual_dtype",
    ),
    (
        "ErrorFeedback(residual_dtype='bf16')",
        lambda: gk.ErrorFeedback(gk.TopK(0.1), residual_dtype="bf16"),
        TypeError,
        "residual_dtype",
    ),
]


@pytest.mark.parametrize("make, error, name", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_configuration_is_refused_by_name(make, error, name):
    with pytest.raises(error, match=name):
        make()


@pytest.mark.parametrize(
    "bad", [torch.arange(6), torch.ones(3, dtype=torch.int32), torch.ones(2, dtype=torch.bool), [1.0, 2.0], 3.0, None]
)
@pytest.mark.parametrize("name", ALL)
def test_compress_refuses_non_floating_tensors(name, bad):
    with pytest.raises(TypeError, match="tensor"):
        build(name).compress(bad)


@pytest.mark.parametrize("name", ALL)
def test_decompress_refuses_foreign_payloads(name):
    compressor = build(name)
    x = gaussian(100, dtype=torch.float32).view(10, 10)
    for other_name in ALL:
        other = build(other_name)
        if type(inner(other)) is type(inner(compressor)):
            continue
        payload = other.compress(x)
        with pytest.raises(ValueError, match="payload"):
            compressor.decompress(payload)
    for not_a_payload in (x, [x], None, {"tensors": [x]}):
        with pytest.raises(TypeError, match="Payload"):
            compressor.decompress(not_a_payload)


BAD_STATES = {
    "error_feedback_randomk": [
        [],
        {},
        {"residuals": {}},
        {"residuals": {}, "compressor": {"step": 0}, "extra": 1},
        {"residuals": [], "compressor": {"step": 0}},
        {"residuals": {"w": "not a tensor"}, "compressor": {"step": 0}},
        {"residuals": {"w": torch.zeros(3)}, "compressor": {"step": -1}},
        {"residuals": {"w": torch.zeros(3)}, "compressor": {"step": "3"}},
        {"residuals": {"w": torch.zeros(3)}, "compressor": {}},
        # a valid compressor state with bad residuals: the compressor must not keep it
        {"residuals": {"w": [0.0]}, "compressor": {"step": 123}},
        {"residuals": None, "compressor": {"step": 123}},
    ],
    "error_feedback_topk": [{"residuals": {}, "compressor": {"step": 0}}, {"residuals": {"w": 1.0}, "compressor": {}}],
    "dgc": [
        [],
        {},
        {"momentum": {}, "velocity": {}},
        {"momentum": {}, "velocity": {}, "steps": {}, "extra": 0},
        {"momentum": {}, "velocity": {}, "steps": {"w": -1}},
        {"momentum": {}, "velocity": {}, "steps": {"w": 1.5}},
        {"momentum": {}, "velocity": {}, "steps": [1]},
        {"momentum": {"w": torch.zeros(3)}, "velocity": {"w": "x"}, "steps": {"w": 1}},
        {"momentum": [], "velocity": {}, "steps": {"w": 1}},
    ],
    "powersgd_rank2": [
        [],
        {},
        {"residuals": {}},
        {"residuals": {}, "q": {}, "extra": 0},
        {"residuals": {}, "q": {"w": torch.zeros(10, 1)}},  # saved with another rank
        {"residuals": {}, "q": {"w": torch.zeros(10)}},
        {"residuals": {}, "q": {"w": "x"}},
        {"residuals": {"w": "x"}, "q": {"w": torch.zeros(10, 2)}},
        {"residuals": [], "q": {}},
    ],
    "randomk": [[], {}, {"step": -1}, {"step": "3"}, {"step": 1.0}, {"step": True}, {"step": 1, "extra": 0}, None],
}


@pytest.mark.parametrize("name", sorted(BAD_STATES))
def test_failed_load_names_the_state_and_changes_nothing(name):
    compressor = stateful_after_steps(name)
    before = compressor.state_dict()
    for bad in BAD_STATES[name]:
        with pytest.raises((ValueError, TypeError), match="state_dict"):
            compressor.load_state_dict(bad)
        assert_same_state(compressor.state_dict(), before)
    # and it still continues exactly like an untouched twin
    _, keyed = checkpointed(name)
    twin = stateful_after_steps(name)
    more = checkpoint_inputs(seed=2)[:4]
    for a, b in zip(run_steps(compressor, more, keyed), run_steps(twin, more, keyed)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("compressor", [gk.TopK(0.1), gk.SignSGD(), gk.QSGD()])
def test_stateless_compressors_refuse_foreign_state(compressor):
    assert compressor.state_dict() == {}
    compressor.load_state_dict({})
    with pytest.raises(ValueError, match="state_dict"):
        compressor.load_state_dict({"step": 0})
    with pytest.raises(TypeError, match="state_dict"):
        compressor.load_state_dict([])


def test_keyed_state_refuses_bad_state_and_keeps_its_own():
    keyed = KeyedState(["momentum", "velocity"])
    keyed.get(BUCKET, torch.zeros(15))["momentum"].fill_(1.0)
    before = keyed.state_dict()
    for bad in (
        {},
        {"momentum": {}},
        {"momentum": {}, "velocity": {}, "x": {}},
        {"momentum": {"w": 1}, "velocity": {}},
        {"momentum": [], "velocity": {}},
        None,
    ):
        with pytest.raises((ValueError, TypeError), match="load_state_dict"):
            keyed.load_state_dict(bad, "Owner")
        assert_same_state(keyed.state_dict(), before)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: gk.ErrorFeedback(gk.TopK(0.1)), "residual"),
        (lambda: gk.DGC(0.1), "momentum"),
        (gk.PowerSGD, "residual"),
    ],
    ids=["ErrorFeedback", "DGC", "PowerSGD"],
)
def test_tensors_of_two_sizes_without_key_are_refused_with_the_key_hint(make, field):
    # Nothing was loaded: the state of the first tensor is in the way, and a key per tensor keeps them apart.
    compressor = make()
    compressor.compress(torch.randn(8, 6))
    before = compressor.state_dict()
    words = (
        f"the {field} kept for a tensor compressed without key= must have 60 entries (its size here), got 48; "
        f"pass a distinct key= per tensor (the {field} is kept per key)"
    )
    with pytest.raises(ValueError, match="^" + re.escape(words) + "$"):
        compressor.compress(torch.randn(10, 6))
    assert_same_state(compressor.state_dict(), before)
    compressor.compress(torch.randn(10, 6), key="other")  # its own key: its own state


def test_a_loaded_state_of_another_size_keeps_the_load_hint_until_placed():
    ef = gk.ErrorFeedback(gk.TopK(0.5))
    ef.load_state_dict({"residuals": {"w": torch.ones(6)}, "compressor": {}})
    with pytest.raises(ValueError, match=r"'w' must have 8 entries \(its size here\), got 6; load the state saved"):
        ef.compress(torch.ones(8), key="w")
    ef.load_state_dict({"residuals": {"w": torch.ones(8)}, "compressor": {}})
    ef.compress(torch.ones(8), key="w")  # placed: a later size change is a key's, not the checkpoint's
    with pytest.raises(ValueError, match=r"'w' must have 6 entries \(its size here\), got 8; pass a distinct key="):
        ef.compress(torch.ones(6), key="w")
