"""GradContext: the gradients of one optimizer step, as the stages see them.

Norm-scaling stages, the tracker and the step report all need per-parameter
norms. The context computes them once (one fused pass per device and dtype),
keeps them as a tensor on the gradients' device, and keeps them right when a
stage rescales the gradients, so later stages and the tracker read them for
free instead of making another pass over every gradient.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from operator import attrgetter, is_

import torch
from torch import Tensor

from gradkit import _dtensor, _foreach

__all__ = ["GradContext", "Attached", "same_params", "same_tensors"]

_GRAD = attrgetter("grad")
_KIND = attrgetter("device", "dtype", "shape")


def kinds(tensors: Sequence[Tensor]) -> tuple:
    """The (device, dtype, shape) of each tensor: what a grouping or a copy kept of them depends on."""
    return tuple(map(_KIND, tensors))


class GradContext:
    """Named parameters that have a gradient, with cached per-parameter L2 norms.

    Parameters whose ``.grad`` is None are left out, as torch's clipping does.

    Args:
        names: one name per parameter (used by name-based state and reports).
        params: the parameters, in the same order.

    Example:
        >>> ctx = GradContext.from_parameters(model.parameters())
        >>> gk.ClipByGlobalNorm(1.0)(ctx)
        >>> ctx.total_norm()   # the norm after clipping, from the cache
    """

    def __init__(self, names: Sequence[str], params: Sequence[Tensor]) -> None:
        names, params = list(names), list(params)
        if len(names) != len(params):
            raise ValueError(
                f"names has {len(names)} entries but params has {len(params)}; pass one name per parameter"
            )
        for name, p in zip(names, params):
            if not isinstance(name, str):
                raise TypeError(
                    f"names must be strings, got {type(name).__name__} {name!r}; pass the parameter names, e.g. from "
                    "model.named_parameters()"
                )
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"params must be tensors, got {type(p).__name__} for {name!r}; pass the parameters, e.g. "
                    "list(model.parameters())"
                )
        kept = [(name, p) for name, p in zip(names, params) if p.grad is not None]
        self.names: list[str] = [name for name, _ in kept]
        self.params: list[Tensor] = [p for _, p in kept]
        self.grads: list[Tensor] = [p.grad for p in self.params]  # type: ignore[misc]
        #: whether some gradients are DTensor shards (FSDP2, tensor parallel): norms are then reduced across ranks
        self.sharded: bool = _dtensor.any_dtensor(self.grads)
        # The pieces this rank holds (the gradients themselves when unsharded): every pass runs on them.
        self._local: list[Tensor] = _dtensor.locals_of(self.grads) if self.sharded else self.grads
        self._init_cache(None)

    def _init_cache(self, groups: _foreach.Groups | None) -> None:
        # The grouping of `_local` by (device, dtype), when the caller knows it (see `Attached`).
        self._groups = groups
        self._norms: Tensor | None = None
        # The global norm of `_norms`, kept until they change (a step asks for it several times).
        self._total: Tensor | None = None
        # A factor the gradients still have to be multiplied by (see `defer_scale`), or None.
        self._pending: Tensor | float | None = None
        #: per-parameter norms before the clip stages ran (set by the pipeline), for trackers
        self.pre_clip_norms: Tensor | None = None

    @classmethod
    def from_parameters(cls, parameters: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Tensor) -> GradContext:
        """A context over plain parameters, named by their position, or over ``named_parameters()`` pairs,
        named by them (what name-matching stages such as ``AGC(exclude=...)`` need outside a pipeline)."""
        if not isinstance(parameters, Tensor):
            try:
                parameters = list(parameters)  # type: ignore[call-overload]
            except TypeError:
                pass  # check_parameters names what was passed
            else:
                if named_pairs(parameters):
                    return cls([name for name, _ in parameters], check_parameters([p for _, p in parameters]))
        params = check_parameters(parameters)
        return cls([str(i) for i in range(len(params))], params)

    def __len__(self) -> int:
        return len(self.grads)

    def groups(self) -> _foreach.Groups:
        """The (device, dtype) grouping of this rank's gradients (their local pieces when sharded), found once."""
        if self._groups is None:
            self._groups = _foreach.Groups.of(self._local)
        return self._groups

    def defer_scale(self, factor: Tensor | float) -> None:
        """Say that the true gradients are `factor` times what ``p.grad`` holds now, without a pass.

        The norms account for it at once; the next `scale_` or `scale_each_` multiplies by
        both factors in one pass (`materialize_` does it alone). Only for a caller whose next
        gradient-reading stage scales through this context (``ClipByGlobalNorm``, as the
        pipeline arranges), since ``grads`` keep the unscaled values until then.
        A factor of exactly 1 (a Python number) defers nothing: multiplying by it changes no bit.
        """
        if not isinstance(factor, Tensor) and factor == 1:
            return
        if self._pending is not None:
            factor = self._pending * factor
        if self._norms is not None:
            self._set_norms(self._norms * _magnitude(factor, self._norms))
        self._pending = factor

    @property
    def pending_factor(self) -> Tensor | float | None:
        """The factor from `defer_scale` still to be applied to the gradients, or None."""
        return self._pending

    def materialize_(self) -> None:
        """Apply a deferred factor to the gradients now (one pass; the norms stay cached)."""
        if self._pending is not None and self.grads:
            self._scale_local(self._pending)
        self._pending = None

    def norms(self) -> Tensor:
        """Per-parameter gradient L2 norms as one 1-D tensor (no host sync; cached: do not modify it in place).

        For DTensor gradients (FSDP2 or tensor-parallel shards) these are the norms of
        the *full* gradients, the same on every rank: one all-reduce of the squared
        shard norms for all parameters (replicated copies counted once). Every rank
        must then call it at the same point, as the pipeline does.
        """
        if not self.grads:
            return torch.zeros(0)
        if self._norms is None:
            groups = self._groups if self._groups is not None else _foreach.Groups.of(self._local)
            # At least float32, so that bf16 gradients do not get a bf16-rounded norm; one stack
            # (it promotes mixed dtypes), with no Python work per tensor on one device.
            norms = groups.stacked_norms(self._local, 2.0, at_least=torch.float32)
            if self.sharded:
                norms = _dtensor.reduce_sums(norms.square(), self.grads).sqrt()
            if self._pending is not None:
                # Homogeneous: the norm of factor x sum is |factor| x the norm of the sum.
                norms = norms * _magnitude(self._pending, norms)
            self._set_norms(norms)
        return self._norms  # type: ignore[return-value]

    def _set_norms(self, norms: Tensor | None) -> None:
        self._norms, self._total = norms, None

    def total_norm(self) -> Tensor:
        """The global L2 norm of all gradients (0-d tensor; 0 when there are none).

        A plain tensor, the same on every rank, also when the gradients are DTensor shards.
        Cached: every call returns the same tensor until the gradients change (`modified`, or a
        scale through this context), and the step's report holds it; do not modify it in place.
        """
        if not self.grads:
            return torch.zeros(())
        if self._total is None:
            self._total = torch.linalg.vector_norm(self.norms())
        return self._total

    def scale_(self, factor: Tensor | float, *, nonnegative: bool = False) -> None:
        """Multiply every gradient by one factor, keeping the cached norms right.

        Args:
            factor: a Python number or a 0-d tensor.
            nonnegative: the caller knows `factor` is >= 0 (or NaN), e.g. a clip coefficient: the
                norms are multiplied by it as it is, one operation fewer than by its magnitude.
        """
        if not self.grads:
            return
        # A deferred factor rides along: one pass writes both.
        self._scale_local(factor if self._pending is None else self._pending * factor)
        self._pending = None
        if self._norms is not None:
            magnitude = _on_like(factor, self._norms) if nonnegative else _magnitude(factor, self._norms)
            self._set_norms(self._norms * magnitude)

    def _scale_local(self, factor: Tensor | float) -> None:
        groups = self._groups if self._groups is not None else _foreach.Groups.of(self._local)
        groups.scale_(self._local, factor)

    def scale_each_(self, factors: Tensor) -> None:
        """Multiply gradient i by ``factors[i]`` (a 1-D tensor), keeping the cached norms right."""
        if not self.grads:
            return
        if self._norms is not None:
            self._set_norms(self._norms * factors.to(self._norms).abs())
        if self._pending is not None:
            factors, self._pending = factors * self._pending, None
        for (device, _), (members, positions) in _foreach.group_tensors(self._local).items():
            local = factors.to(device)
            torch._foreach_mul_(members, [local[i] for i in positions])
        for grad, factor in zip(self._local, factors):
            if grad.is_sparse:
                grad.mul_(factor.to(grad.device))

    def modified(self) -> None:
        """Say that the gradients changed in a way the cache cannot follow (value clipping, AGC)."""
        self.materialize_()
        self._set_norms(None)


class Attached:
    """What every step's `GradContext` over one fixed parameter list needs, found once.

    Names, parameters, whether any is a DTensor, and the (device, dtype) grouping of their
    gradients: a step whose every parameter has a gradient builds its context with no
    Python work per tensor beyond collecting the gradients (as torch's own clipping does).

    Args:
        names: one name per parameter.
        params: the parameters (checked as `GradContext` checks them, once).

    Example:
        >>> attached = Attached(names, params)
        >>> ctx = attached.context()   # each step, after backward
    """

    def __init__(self, names: Sequence[str], params: Sequence[Tensor]) -> None:
        GradContext(names, params)  # the checks, with their errors
        self.names, self.params = list(names), list(params)
        self.sharded = _dtensor.any_dtensor(self.params)
        self._groups: _foreach.Groups | None = None
        self._kinds = kinds(self.params)

    def moved(self) -> bool:
        """Whether a parameter changed device, dtype or shape since this was made (a model converted in place:
        ``model.double()``, ``model.cuda()``, which keep the parameter objects; a parameter resized through
        ``.data``): the grouping and element counts kept for the gradients then no longer hold, and a new
        `Attached` is needed. One pass over the parameters."""
        return kinds(self.params) != self._kinds

    def converted(self) -> str | None:
        """How the first parameter changed dtype or device since this was made ("torch.float32 on cpu, now
        torch.float64 on cpu"), or None. One parameter only: a model converted in place converts them all."""
        if not self.params:
            return None
        (device, dtype, _), now = self._kinds[0], self.params[0]
        if (now.device, now.dtype) == (device, dtype):
            return None
        return f"{dtype} on {device}, now {now.dtype} on {now.device}"

    def context(self) -> GradContext:
        """The context of the gradients the parameters hold now."""
        grads = list(map(_GRAD, self.params))
        # Not `None in grads`: that compares each tensor with None through Tensor.__eq__ (slow).
        if self.sharded or any(grad is None for grad in grads):
            # Some parameters have no gradient (or shards need unwrapping): the general path.
            return GradContext(self.names, self.params)
        groups = self._groups
        if groups is None or groups.count != len(grads):
            # Gradients keep their parameter's device and dtype (autograd enforces it) and
            # their layout, so the grouping found on the first full step holds for the rest.
            groups = self._groups = _foreach.Groups(grads)
        ctx = GradContext.__new__(GradContext)
        ctx.names, ctx.params, ctx.grads = self.names, self.params, grads
        ctx.sharded, ctx._local = False, grads
        ctx._init_cache(groups)
        return ctx


def same_params(
    names: Sequence[str], params: Sequence[Tensor], other_names: Sequence[str], other_params: Sequence[Tensor]
) -> bool:
    """Whether two parameter lists are the same parameters: the same names and the very same tensors, in order.

    The one rule by which a tracker, a trainer's boundary and an Average tell a second attach to the same
    parameters (a second ``fit``, a notebook cell run again) from another model or another trainable set
    (a layer frozen). Identity, not values: a new model of the same shape is other parameters.

    Example:
        >>> same_params(["w"], [model.w], ["w"], [model.w])
        True
    """
    return list(names) == list(other_names) and same_tensors(params, other_params)


def same_tensors(params: Sequence[Tensor], other_params: Sequence[Tensor]) -> bool:
    """Whether two lists hold the very same tensors, in order (identity on the host, no tensor read)."""
    return len(params) == len(other_params) and all(map(is_, params, other_params))


def _magnitude(factor: Tensor | float, like: Tensor) -> Tensor | float:
    # |factor|: a norm is never negative, whatever the sign of the factor.
    return factor.to(like).abs() if isinstance(factor, Tensor) else abs(factor)


def _on_like(factor: Tensor | float, like: Tensor) -> Tensor | float:
    # A factor known to be >= 0 (or NaN, which makes the norms NaN either way) is its own magnitude.
    return factor.to(like) if isinstance(factor, Tensor) else factor


def named_pairs(items: Sequence[object]) -> bool:
    """Whether `items` are ``named_parameters()`` pairs: (str, tensor) each, and at least one."""
    return bool(items) and all(
        isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Tensor)
        for item in items
    )


def check_parameters(parameters: object) -> list[Tensor]:
    """`parameters` (one tensor or an iterable of tensors) as a list, or a TypeError naming it."""
    if isinstance(parameters, Tensor):
        return [parameters]
    try:
        params = list(parameters)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(
            f"parameters must be a tensor or an iterable of tensors, got {type(parameters).__name__}; pass "
            "model.parameters()"
        ) from None
    for index, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(
                f"parameters must hold tensors, but item #{index} is {type(p).__name__} {_short(p)}; pass "
                "model.parameters()"
            )
    return params


def _short(value: object) -> str:
    """`value`'s repr, cut to one line of at most 80 characters (a tensor inside a pair would fill the screen)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."
