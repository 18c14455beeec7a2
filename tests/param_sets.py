"""Random parameter sets with gradients, shared by the clipping tests."""

from __future__ import annotations

import torch


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
