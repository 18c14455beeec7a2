"""Parameter names as the bare model has them: the names state is saved and loaded under.

DDP wraps a model as ``module`` and ``torch.compile`` as ``_orig_mod``, so the same
parameter is ``w``, ``module.w`` or ``_orig_mod.w`` depending on how the model was
wrapped when the state was saved. Names are taken from the unwrapped model (and a
compiled submodule's ``_orig_mod`` part is dropped), so that state saved with or
without DDP, compiled or eager, is interchangeable.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

__all__ = ["bare_name", "named_parameters", "sparse_gradient_names", "trainable", "unwrap"]

_COMPILED = "_orig_mod"


def _is_compiled(module: object) -> bool:
    # Only torch.compile makes an OptimizedModule; if dynamo was never imported there is none
    # (importing it just to ask would cost seconds).
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


def unwrap(model: object) -> object:
    """`model` without its DDP and torch.compile wrappers (in any order and number)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod  # type: ignore[union-attr]
        else:
            return model


def bare_name(name: str) -> str:
    """`name` without the ``_orig_mod`` parts of compiled submodules ("block._orig_mod.w" -> "block.w")."""
    if _COMPILED not in name:
        return name
    return ".".join(part for part in name.split(".") if part != _COMPILED)


def named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` of the unwrapped model, under bare names.

    Example:
        >>> named_parameters(torch.compile(nn.Linear(2, 3)))[0][0]
        'weight'
    """
    module = unwrap(model)
    assert isinstance(module, nn.Module)
    return [(bare_name(name), p) for name, p in module.named_parameters()]


def trainable(model: object) -> tuple[list[str], list[nn.Parameter], list[tuple[str, nn.Parameter]]]:
    """Names and parameters that require grad, and the (name, parameter) pairs that do not,
    of an ``nn.Module`` (under bare names) or an iterable of parameters or (name, parameter) pairs.

    Raises:
        TypeError: `model` is a single tensor, not iterable, or holds something else than tensors.
        ValueError: no parameter requires grad, or a parameter or a name is given twice.

    Example:
        >>> names, params, frozen = trainable(nn.Linear(2, 3))
        >>> names
        ['weight', 'bias']
    """
    model = unwrap(model)
    if isinstance(model, nn.Module):
        pairs = named_parameters(model)
    elif isinstance(model, Tensor):
        raise TypeError(
            "model must be an nn.Module or an iterable of parameters, got a single tensor; wrap it in a list: [param]"
        )
    else:
        try:
            items = list(model)  # type: ignore[call-overload]
        except TypeError:
            what = type(model).__name__
            raise TypeError(f"model must be an nn.Module or an iterable of parameters, got {what}") from None
        pairs = [item if isinstance(item, tuple) else (str(i), item) for i, item in enumerate(items)]
    for name, p in pairs:
        if not isinstance(p, Tensor):
            raise TypeError(
                f"parameter {name!r} is a {type(p).__name__}, not a tensor; "
                "pass model.parameters() or model.named_parameters()"
            )
    _unique(pairs)
    frozen = [(name, p) for name, p in pairs if not p.requires_grad]
    pairs = [(name, p) for name, p in pairs if p.requires_grad]
    if not pairs:
        raise ValueError(
            "the model has no parameters that require grad; pass the module being trained (or unfreeze some parameters)"
        )
    return [name for name, _ in pairs], [p for _, p in pairs], frozen


def _unique(pairs: list[tuple[str, Tensor]]) -> None:
    """Refuse a parameter listed twice (its gradient would be summed, averaged and clipped
    twice) and a name used twice (state is saved and loaded by name)."""
    seen: dict[int, str] = {}
    names: set[str] = set()
    for name, p in pairs:
        if id(p) in seen:
            raise ValueError(
                f"parameter {name!r} is the same tensor as parameter {seen[id(p)]!r}: a parameter listed twice "
                "would have its gradient counted twice; pass each parameter once, e.g. model.parameters() "
                "(which lists a shared parameter once)"
            )
        if name in names:
            raise ValueError(
                f"two parameters are named {name!r}; state is saved and loaded by name: pass (name, parameter) "
                "pairs with unique names, e.g. model.named_parameters()"
            )
        seen[id(p)] = name
        names.add(name)


def sparse_gradient_names(model: object) -> set[str]:
    """Bare names of the parameters whose gradients are sparse (embeddings built with ``sparse=True``)."""
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        return set()
    return {
        bare_name(f"{prefix}.weight") if prefix else "weight"
        for prefix, module in model.named_modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse
    }
