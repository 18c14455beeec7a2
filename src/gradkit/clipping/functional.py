"""Module-level clipping functions with torch's semantics, plus a process-group norm.

`clip_grad_norm_` gives the same results as `torch.nn.utils.clip_grad_norm_`
(same norm, same coefficient, same in-place update) and adds ``group=`` for
parameters sharded across processes, where every rank must clip by the norm of
the *whole* gradient, not of its own shard.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from operator import attrgetter, is_not

import torch
import torch.distributed as dist
from torch import Tensor

from gradkit import _checks, _dtensor, _foreach, distributed
from gradkit.context import check_parameters

__all__ = ["clip_grad_norm_", "clip_grad_value_", "grad_norms", "check_norm_type", "clip_coefficient"]

Parameters = Iterable[Tensor] | Tensor

_GRAD = attrgetter("grad")
_is_not_none = partial(is_not, None)


@torch.no_grad()  # like torch: gradients that require grad (create_graph=True) are scaled in place too
def clip_grad_norm_(
    parameters: Parameters,
    max_norm: float,
    norm_type: float = 2.0,
    *,
    group: dist.ProcessGroup | None = None,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """Scale gradients in place so that their total norm is at most `max_norm`.

    The norm is taken over all gradients together, as if concatenated into one
    vector; parameters whose ``.grad`` is None are skipped. Results match
    ``torch.nn.utils.clip_grad_norm_`` for every norm type.

    Args:
        parameters: tensors (or one tensor) whose ``.grad`` is clipped.
        max_norm: the largest allowed total norm (> 0, finite).
        norm_type: p of the p-norm (> 0), or ``float("inf")`` for the max-norm.
        group: a process group over which the parameters are *sharded*: the
            local norms are combined (p-th powers summed, or max for inf) so
            that every rank uses the global norm. Leave it None for replicated
            parameters, whose gradients are already averaged, and for DTensor
            gradients (FSDP2 ``fully_shard``, tensor parallel): their device mesh
            says how they are sharded, and the norm is that of the full gradients
            (replicated pieces counted once), a plain tensor equal on every rank.
        error_if_nonfinite: raise if the total norm is NaN or inf. This reads
            the norm on the host (one device sync), which is why it is off.

    Returns:
        The total norm before clipping (0-d tensor).

    Raises:
        ValueError / TypeError: for a bad `max_norm` or `norm_type`.
        RuntimeError: with ``error_if_nonfinite=True`` and a NaN/inf norm.

    Example:
        >>> norm = gk.clip_grad_norm_(model.parameters(), max_norm=1.0)
    """
    max_norm = _checks.positive_number("max_norm", max_norm, "pass the largest gradient norm to allow, e.g. 1.0")
    norm_type = check_norm_type(norm_type)
    check_group(group)
    _checks.flag("error_if_nonfinite", error_if_nonfinite, "pass True to raise on a NaN/inf norm, False to clip anyway")
    params = _parameter_list(parameters)
    grads = _present_grads(params)
    sharded = _dtensor.any_dtensor(grads)
    local = _dtensor.locals_of(grads) if sharded else grads  # DTensors: this rank's pieces, which share storage
    groups = _foreach.Groups.of(local)  # once: both passes below reuse it
    if sharded:
        norms = groups.stacked_norms(local, norm_type)
        total = torch.linalg.vector_norm(_full_norms(norms, grads, norm_type), norm_type)
    elif grads:
        total = groups.total_norm(local, norm_type)
    elif group is None:
        return torch.tensor(0.0)
    else:
        # A shard without gradients still contributes (a zero) to the collective,
        # or the other ranks would wait for it until the group's timeout.
        like = params[0] if params and params[0].is_floating_point() else torch.zeros(())
        total = torch.zeros((), device=like.device, dtype=like.dtype)
    if group is not None:
        total = reduce_norm(total, norm_type, group)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is non-finite ({total}); "
            "pass error_if_nonfinite=False to clip anyway"
        )
    groups.scale_(local, clip_coefficient(total, max_norm))
    return total


def clip_coefficient(total_norm: Tensor, max_norm: float | Tensor) -> Tensor:
    """min(1, max_norm / (total_norm + 1e-6)), as torch computes it."""
    # Clamping instead of `if total_norm > max_norm` avoids a device sync; multiplying
    # by 1.0 when no clipping is needed costs the same pass torch makes.
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


@torch.no_grad()
def clip_grad_value_(parameters: Parameters, clip_value: float) -> None:
    """Clamp every gradient element to [-clip_value, clip_value] in place (torch's semantics).

    Example:
        >>> gk.clip_grad_value_(model.parameters(), 0.5)
    """
    clip_value = _checks.positive_number("clip_value", clip_value, "pass the largest absolute gradient value to allow")
    params = [p for p in check_parameters(parameters) if p.grad is not None]
    for p in params:
        if p.grad.is_sparse:  # clamp each element's total, so sum repeated indices first
            p.grad = p.grad.coalesce()
            p.grad._values().clamp_(-clip_value, clip_value)
    for _, (members, _) in _foreach.group_tensors([p.grad for p in params]).items():
        torch._foreach_clamp_min_(members, -clip_value)
        torch._foreach_clamp_max_(members, clip_value)


@torch.no_grad()
def grad_norms(parameters: Parameters, norm_type: float = 2.0) -> Tensor:
    """One gradient norm per parameter that has a gradient, as a 1-D tensor; no host sync.

    For DTensor gradients (FSDP2, tensor parallel) these are the norms of the full
    gradients, the same on every rank (one all-reduce for all of them; every rank must call it).

    Example:
        >>> norms = gk.grad_norms(model.parameters())   # norms[i] belongs to the i-th parameter with a grad
    """
    norm_type = check_norm_type(norm_type)
    grads = _present_grads(_parameter_list(parameters))
    if not grads:
        return torch.zeros(0)
    sharded = _dtensor.any_dtensor(grads)
    local = _dtensor.locals_of(grads) if sharded else grads
    norms = _foreach.Groups.of(local).stacked_norms(local, norm_type)
    # DTensor gradients: norms of the full gradients, one collective for all of them.
    return _full_norms(norms, grads, norm_type) if sharded else norms


def _full_norms(local: Tensor, grads: list[Tensor], norm_type: float) -> Tensor:
    """Per-tensor `norm_type`-norms of the full tensors from the norms of this rank's pieces."""
    if math.isinf(norm_type):
        return _dtensor.reduce_max(local, grads)
    powered = local.double() ** norm_type  # double: p-th powers of large norms overflow float32
    return (_dtensor.reduce_sums(powered, grads) ** (1.0 / norm_type)).to(local.dtype)


def reduce_norm(local_norm: Tensor, norm_type: float, group: dist.ProcessGroup) -> Tensor:
    """The norm of a vector sharded across `group`, from each rank's norm of its shard."""
    if not dist.is_initialized():
        raise ValueError(
            "group= was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first, or pass group=None for unsharded parameters"
        )
    if math.isinf(norm_type):
        # double on every rank, as below: shards may hold gradients of different dtypes.
        combined = local_norm.double()
        distributed.run(
            dist.all_reduce,
            "gradient clipping: all-reduce of the sharded max-norm",
            None,
            combined,
            op=dist.ReduceOp.MAX,
            group=group,
        )
        return combined.to(local_norm.dtype)
    powered = local_norm.double() ** norm_type  # double: p-th powers of large norms overflow float32
    distributed.run(
        dist.all_reduce,
        "gradient clipping: all-reduce of the sharded norm",
        None,
        powered,
        op=dist.ReduceOp.SUM,
        group=group,
    )
    return (powered ** (1.0 / norm_type)).to(local_norm.dtype)


def check_norm_type(norm_type: object) -> float:
    """`norm_type` as a float if it is a valid p (> 0, or inf)."""
    if isinstance(norm_type, bool):  # float(True) would be a silent 1-norm
        raise TypeError(f"norm_type must be a number or 'inf', got {norm_type!r}; use 2.0 for the L2 norm")
    try:
        p = float(norm_type)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"norm_type must be a number or 'inf', got {norm_type!r}; use 2.0 for the L2 norm") from None
    if math.isnan(p) or p <= 0:
        raise ValueError(
            f"norm_type must be > 0 or inf, got {norm_type!r}; use 2.0 for the L2 norm or 'inf' for the max"
        )
    return p


def check_group(group: object) -> None:
    """`group` must be a torch.distributed process group or None."""
    if group is not None and not dist.is_initialized():
        raise ValueError(
            "group= was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first, or pass group=None for unsharded parameters"
        )
    distributed.check_group_type(group)


def _parameter_list(parameters: Parameters) -> list[Tensor]:
    """`check_parameters`, with the check made over the distinct types instead of a Python loop per tensor."""
    if isinstance(parameters, Tensor) or not hasattr(parameters, "__iter__"):
        return check_parameters(parameters)  # one tensor; or not an iterable, which it names in its error
    params = list(parameters)
    if all(issubclass(kind, Tensor) for kind in set(map(type, params))):
        return params
    return check_parameters(params)  # raises, naming the first item that is not a tensor


def _present_grads(params: list[Tensor]) -> list[Tensor]:
    """The gradients that are not None, in order (read once per parameter, filtered in C)."""
    return list(filter(_is_not_none, map(_GRAD, params)))
