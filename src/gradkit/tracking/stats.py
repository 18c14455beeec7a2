"""Per-parameter and per-module gradient statistics, computed on the device.

A logging step needs a handful of numbers per parameter. They are computed as
one (P, C) tensor on the gradients' device and read with a single host
transfer; the module view (a module is a parameter name minus its last
component) is assembled on the host from those P rows, so nothing is read
twice. The per-parameter L2 norms come from the step's `GradContext` cache:
they are never recomputed here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gradkit import _foreach

__all__ = ["module_of", "COLUMNS", "param_stats", "host_dtype", "nonfinite_counts", "summarize", "histograms"]

ROOT = "(root)"

#: the columns of `param_stats`, in order
COLUMNS = ("norm_pre_clip", "norm", "max_abs", "nonzero", "weight_norm")


def module_of(name: str) -> str:
    """The module a parameter belongs to: its name minus the last component ('(root)' at top level)."""
    return name.rpartition(".")[0] or ROOT


def host_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps element counts exact up to 2**53; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def param_stats(grads: Sequence[Tensor], params: Sequence[Tensor], norms: Tensor, pre_clip: Tensor | None, *, detail: bool = True) -> Tensor:
    """A (P, len(COLUMNS)) tensor of statistics, one row per parameter, on ``norms.device``; no host sync.

    Args:
        grads: the final gradients (after the clip stages).
        params: the parameters (weights before the update).
        norms: per-parameter L2 norms of `grads` (the step's cached ``ctx.norms()``).
        pre_clip: the norms before clipping (``ctx.pre_clip_norms``), or None for `norms`.
        detail: also max |g|, the nonzero count and the weight norm; otherwise
            those columns are NaN and the call costs nothing but the cached norms.

    Cost: with `detail`, three passes (max |g|, nonzero count, weight norm), no copies.
    """
    device = norms.device
    dtype = host_dtype(device)
    if not detail:
        base = (pre_clip if pre_clip is not None else norms).to(device, dtype)
        missing = torch.full((len(grads), len(COLUMNS) - 2), math.nan, device=device, dtype=dtype)
        return torch.cat([base.unsqueeze(1), norms.to(device, dtype).unsqueeze(1), missing], dim=1)
    max_abs = [_max_abs(g) for g in grads]
    weight = _foreach.per_tensor_norms([p.detach() for p in params], 2.0, at_least=torch.float32)
    nonzero = [torch.count_nonzero(g) for g in grads]
    columns = [
        (pre_clip if pre_clip is not None else norms).to(device, dtype),
        norms.to(device, dtype),
        torch.stack([m.to(device, dtype) for m in max_abs]),
        torch.stack([n.to(device, dtype) for n in nonzero]),
        torch.stack([w.to(device, dtype) for w in weight]),
    ]
    return torch.stack(columns, dim=1)


def _max_abs(grad: Tensor) -> Tensor:
    # aminmax is one fast pass on every backend; the foreach inf-norm is ~10x slower on CPU.
    if grad.numel() == 0:
        return torch.zeros((), device=grad.device)
    low, high = torch.aminmax(grad.detach())
    return torch.maximum(-low, high)


def nonfinite_counts(grads: Sequence[Tensor], indices: Sequence[int]) -> dict[int, tuple[int, int]]:
    """(NaN count, Inf count) of the gradients at `indices`; one host read.

    Only called for parameters whose norm is not finite, so a healthy logging
    step never pays for it.
    """
    if not indices:
        return {}
    device = grads[indices[0]].device
    counts = torch.stack([torch.stack([torch.isnan(grads[i]).sum(), torch.isinf(grads[i]).sum()]).to(device) for i in indices])
    return {i: (int(nan), int(inf)) for i, (nan, inf) in zip(indices, counts.tolist())}


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 and math.isfinite(num) and math.isfinite(den) else None


def summarize(
    names: Sequence[str], numels: Sequence[int], rows: Sequence[Sequence[float]], counts: dict[int, tuple[int, int]]
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per-parameter and per-module statistics as plain dicts (host side).

    Module values combine their parameters: L2 norms as the root of the summed
    squares, max |g| as the max, counts as sums, RMS and the zero fraction over
    all of the module's elements.

    Returns:
        (params, modules): name -> {norm_pre_clip, norm, max_abs, rms, zero_frac,
        nan, inf, numel, weight_norm, grad_to_weight}.
    """
    params: dict[str, dict] = {}
    sums: dict[str, dict] = {}
    for i, (name, numel, row) in enumerate(zip(names, numels, rows)):
        pre, norm, max_abs, nonzero, weight = row
        nan, inf = counts.get(i, (0, 0))
        params[name] = _entry(pre**2, norm**2, max_abs, numel, numel - nonzero, nan, inf, weight**2)
        acc = sums.setdefault(module_of(name), {"pre": 0.0, "sq": 0.0, "max": 0.0, "numel": 0, "zeros": 0.0, "nan": 0, "inf": 0, "w": 0.0})
        acc["pre"] += pre**2
        acc["sq"] += norm**2
        acc["max"] = max(acc["max"], max_abs) if not math.isnan(max_abs) else max_abs
        acc["numel"] += numel
        acc["zeros"] += numel - nonzero
        acc["nan"] += nan
        acc["inf"] += inf
        acc["w"] += weight**2
    modules = {
        name: _entry(a["pre"], a["sq"], a["max"], a["numel"], a["zeros"], a["nan"], a["inf"], a["w"]) for name, a in sums.items()
    }
    return params, modules


def _entry(pre_sq: float, sq: float, max_abs: float, numel: int, zeros: float, nan: int, inf: int, w_sq: float) -> dict:
    norm, weight = math.sqrt(sq), math.sqrt(w_sq)
    return {
        "norm_pre_clip": math.sqrt(pre_sq),
        "norm": norm,
        "max_abs": max_abs,
        "rms": norm / math.sqrt(numel) if numel else 0.0,
        "zero_frac": zeros / numel if numel else 0.0,
        "nan": int(nan),
        "inf": int(inf),
        "numel": int(numel),
        "weight_norm": weight,
        "grad_to_weight": _ratio(norm, weight),
        "update_to_weight": None,
    }


def histograms(
    names: Sequence[str], grads: Sequence[Tensor], modules: dict[str, dict], bins: int
) -> dict[str, dict]:
    """Histograms of gradient values per module, binned on the device (``torch.histc``); one host read.

    Each module's range is ``[-max|g|, max|g|]`` from its statistics; modules
    with an all-zero or non-finite gradient are left out.

    Returns:
        module -> {min, max, num, sum, sum_squares, bucket_limits, bucket_counts},
        the arguments of ``SummaryWriter.add_histogram_raw``.
    """
    parts: dict[str, list[Tensor]] = {}
    for name, grad in zip(names, grads):
        module = module_of(name)
        limit = modules[module]["max_abs"]
        if not (math.isfinite(limit) and limit > 0):
            continue
        flat = grad.detach().reshape(-1).float()
        lo, hi = torch.aminmax(flat)
        parts.setdefault(module, []).append(
            torch.cat([torch.histc(flat, bins=bins, min=-limit, max=limit), torch.stack([lo, hi, flat.sum()])]).double()
        )
    if not parts:
        return {}
    order = list(parts)
    device = parts[order[0]][0].device
    table = torch.stack([_combine(parts[m], device) for m in order]).tolist()
    out = {}
    for module, row in zip(order, table):
        limit = modules[module]["max_abs"]
        counts, (lo, hi, total) = row[:bins], row[bins:]
        step = 2 * limit / bins
        out[module] = {
            "min": lo,
            "max": hi,
            "num": modules[module]["numel"],
            "sum": total,
            "sum_squares": modules[module]["norm"] ** 2,
            "bucket_limits": [-limit + step * (k + 1) for k in range(bins)],
            "bucket_counts": counts,
        }
    return out


def _combine(rows: list[Tensor], device: torch.device) -> Tensor:
    stacked = torch.stack([r.to(device) for r in rows])
    bins = stacked.shape[1] - 3
    return torch.cat([stacked[:, :bins].sum(0), stacked[:, bins].min().reshape(1), stacked[:, bins + 1].max().reshape(1), stacked[:, bins + 2].sum().reshape(1)])
