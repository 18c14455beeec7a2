"""Parameter names as the bare model has them: the names state is saved and loaded under.

DDP wraps a model as ``module`` and ``torch.compile`` as ``_orig_mod``, so the same
parameter is ``w``, ``module.w`` or ``_orig_mod.w`` depending on how the model was
wrapped when the state was saved. Names are taken from the unwrapped model (and a
compiled submodule's ``_orig_mod`` part is dropped), so that state saved with or
without DDP, compiled or eager, is interchangeable.
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["bare_name", "named_parameters", "unwrap"]

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
