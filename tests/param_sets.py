"""Random parameter sets with gradients, shared by the clipping tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


def tensor_specs(max_dims: int, max_log_scale: int) -> st.SearchStrategy:
    """One parameter for `make_params`: (shape, dtype, has_grad, log10 of the gradient's scale).

    Shapes include a scalar and empty tensors; most parameters have a gradient."""
    shapes = st.one_of(
        st.just(()),
        st.sampled_from([(0,), (3, 0), (0, 2, 2)]),
        st.lists(st.integers(1, 5), min_size=1, max_size=max_dims).map(tuple),
    )
    return st.tuples(
        shapes,
        st.sampled_from([torch.float32, torch.float64]),
        st.sampled_from([True, True, True, False]),
        st.integers(-max_log_scale, max_log_scale),
    )


def make_params(specs, seed):
    """Parameters with gradients from `specs` (shape, dtype, has_grad, log10 scale)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape, dtype, has_grad, scale in specs:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
        if has_grad:
            p.grad = (torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0**scale).to(dtype)
        params.append(p)
    return params


def clone_params(params):
    """Independent copies of parameters and their gradients."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out
