"""The compressors under test: one table, from which each test's subset follows by the class flags.

Adding a compressor means one class and one row here: every test whose subset its flags
place it in runs it (stateless ones are wrapped in error feedback, sparse ones get the
payload checks, stateful ones the checkpoint checks, all of them the bad-input checks).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import torch

import gradkit as gk

F64 = torch.float64


@dataclass(frozen=True)
class Case:
    """A compressor configuration: `make` builds a fresh one.

    `deterministic`: its output depends on nothing but the input (no random draw, no
    step counter), so two instances given the same inputs send the same payloads.
    """

    name: str
    make: Callable[[], gk.Compressor]
    deterministic: bool = False


CASES = [
    # stateless
    Case("topk", lambda: gk.TopK(0.1)),
    Case("topk_exact", lambda: gk.TopK(0.1, exact=True), deterministic=True),
    Case("topk_fast", lambda: gk.TopK(0.05)),
    Case("topk_exact_sparse", lambda: gk.TopK(0.05, exact=True), deterministic=True),
    Case("topk_fp16_values", lambda: gk.TopK(0.2, value_dtype=torch.float16)),
    Case("topk_exactly_k", lambda: gk.TopK(0.05, exactly_k=True)),
    Case("randomk", lambda: gk.RandomK(0.1, seed=9)),
    Case("randomk_unscaled", lambda: gk.RandomK(0.3, scale=False, seed=3)),
    Case("threshold", lambda: gk.Threshold(0.1), deterministic=True),
    Case("threshold_0.8", lambda: gk.Threshold(0.8), deterministic=True),
    Case("threshold_1.5", lambda: gk.Threshold(1.5), deterministic=True),
    # a cap that no test input reaches: the payload checks still see every entry >= tau
    Case("threshold_fixed_size", lambda: gk.Threshold(1.5, max_density=0.5)),
    Case("fp16", lambda: gk.FP16(), deterministic=True),
    Case("bf16", lambda: gk.BF16(), deterministic=True),
    Case("qsgd", lambda: gk.QSGD()),
    Case("qsgd_seeded", lambda: gk.QSGD(4, block=8, seed=0)),
    Case("signsgd", lambda: gk.SignSGD(), deterministic=True),
    # keyed: state per parameter
    Case("dgc", lambda: gk.DGC(0.1)),
    Case("dgc_warmup_clipped", lambda: gk.DGC(0.1, 0.9, warmup_steps=4, clip_norm=3.0)),
    Case("dgc_exactly_k", lambda: gk.DGC(0.05, exactly_k=True)),
    Case("powersgd", lambda: gk.PowerSGD(1)),
    Case("powersgd_rank2", lambda: gk.PowerSGD(2, seed=3)),
    Case("powersgd_cold_start", lambda: gk.PowerSGD(1, warm_start=False)),
    Case("error_feedback", lambda: gk.ErrorFeedback(gk.TopK(0.1))),
    Case("error_feedback_topk", lambda: gk.ErrorFeedback(gk.TopK(0.2, exact=True))),
    Case("error_feedback_topk_exactly_k", lambda: gk.ErrorFeedback(gk.TopK(0.02, exactly_k=True))),
    Case("error_feedback_randomk", lambda: gk.ErrorFeedback(gk.RandomK(0.3, scale=False, seed=5))),
    Case("error_feedback_signsgd", lambda: gk.ErrorFeedback(gk.SignSGD())),
    Case("error_feedback_qsgd_seeded", lambda: gk.ErrorFeedback(gk.QSGD(4, block=8, seed=2))),
]
BY_NAME = {case.name: case for case in CASES}


def names(keep: Callable[[gk.Compressor], bool]) -> list[str]:
    """The names of the cases whose compressor `keep` accepts, sorted."""
    return sorted(case.name for case in CASES if keep(case.make()))


def build(name: str) -> gk.Compressor:
    """A fresh compressor of the case `name`."""
    return BY_NAME[name].make()


def checkpointed(name: str) -> tuple[Callable[[], gk.Compressor], bool]:
    """(make, keyed) of a stateful case: keyed ones are compressed with a key per tensor."""
    return BY_NAME[name].make, BY_NAME[name].make().keyed


#: every compressor
ALL = names(lambda c: True)
#: what error feedback wraps: compressors without state of their own per parameter
#: (a scaled RandomK is unbiased by design: error feedback pairs with scale=False)
WRAPPABLE = names(lambda c: not c.keyed and (c.biased or not isinstance(c, gk.RandomK)))
#: payloads of (indices, values) in the input's dtype
SPARSIFIERS = names(lambda c: c.sparse and not c.keyed and getattr(c, "value_dtype", None) is None)
#: compressors with state to save: per parameter (keyed), or a step counter or generator
STATEFUL = names(lambda c: c.keyed or bool(c.state_dict()))
DETERMINISTIC = sorted(case.name for case in CASES if case.deterministic)


# -- helpers ---------------------------------------------------------------------------------


def z_bound(tests: int, alpha: float = 1e-6) -> float:
    """Two-sided z-score bound for `tests` simultaneous tests at family-wise error `alpha` (Bonferroni)."""
    return NormalDist().inv_cdf(1.0 - alpha / (2 * tests))


def sent_indices(payload: gk.Payload) -> torch.Tensor:
    """The flat indices a sparse payload really sends (padding left out)."""
    indices = payload.tensors[0].long()
    valid = payload.meta.get("valid")
    return indices[valid] if valid is not None else indices


def sent_mask(payload: gk.Payload) -> torch.Tensor:
    mask = torch.zeros(payload.numel, dtype=torch.bool)
    mask[sent_indices(payload)] = True
    return mask


def roundtrip(state):
    """`state` through torch.save / torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_state(a, b, path="state"):
    """Nested dicts of tensors and numbers, equal bit for bit."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same_state(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{path}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b), f"{path}: values differ"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def energy(t: torch.Tensor) -> float:
    return float((t.double() ** 2).sum())


def gaussian(n, seed=0, dtype=torch.float32):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def with_zeros(n, nonzeros, seed=0, dtype=torch.float32):
    """`n` entries of which `nonzeros` (at random places, magnitudes over six decades) are not 0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, dtype=F64)
    where = torch.randperm(n, generator=gen)[:nonzeros]
    magnitudes = 10.0 ** (torch.rand(nonzeros, generator=gen, dtype=F64) * 6 - 4)
    x[where] = magnitudes * torch.where(torch.rand(nonzeros, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    return x.to(dtype)


def inner(compressor):
    """The compressor that makes the payloads (error feedback hands them over from the one it wraps)."""
    return compressor.compressor if isinstance(compressor, gk.ErrorFeedback) else compressor


# -- checkpoints ---------------------------------------------------------------------------------


def checkpoint_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w": (12, 10), "b": (12,)}
    return [(key, torch.randn(shapes[key], generator=gen, dtype=F64)) for _ in range(8) for key in ("w", "b")]


def run_steps(compressor, inputs, keyed):
    return [
        compressor.decompress(compressor.compress(x, key=key) if keyed else compressor.compress(x)) for key, x in inputs
    ]


BUCKET = (("w", (4, 3)), ("b", (3,)))


def stateful_after_steps(name):
    make, keyed = checkpointed(name)
    compressor = make()
    run_steps(compressor, checkpoint_inputs(seed=1)[:5], keyed)
    return compressor
