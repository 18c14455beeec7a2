"""Find the first module, in backward order, that turned the gradient non-finite.

The cheap path (every step) only sees per-parameter norms, and a NaN spreads
to every parameter upstream of where it appeared. To name its origin, the
tracker arms this locator after a non-finite step: hooks then record, for
each module, whether the gradient arriving at its output and the gradients it
produces (for its inputs and its own parameters) are finite. The origin is
the first module in backward order that received a finite output gradient
and produced a non-finite one.

Hooks are tensor hooks registered on module outputs and inputs from a forward
hook (not ``register_full_backward_hook``, which breaks modules followed by
in-place operations such as ``ReLU(inplace=True)``) plus hooks on parameters.
Each records one flag tensor on the device; the flags are read once, when the
tracker asks for the result. Nothing is installed until a non-finite step
happens, so healthy training never pays for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from gradkit.tracking.stats import ROOT, module_of

__all__ = ["NonfiniteLocator", "LOSS"]

#: the name given when the gradient was non-finite before reaching any module
LOSS = "(loss)"


class NonfiniteLocator:
    """Hooks that locate the first module producing a non-finite gradient.

    Args:
        module: the model, or None (then only parameter hooks are used and the
            origin is the module of the first parameter, in backward order,
            whose gradient is non-finite).
        names, params: the tracked parameters.

    Memory: one boolean per hook firing while armed.
    """

    def __init__(self, module: nn.Module | None, names: Sequence[str], params: Sequence[Tensor]) -> None:
        self.module = module
        self.names, self.params = list(names), list(params)
        self._handles: list = []
        self._events: list[tuple[str, str, Tensor]] = []  # (module, "out"|"in"|"param", all finite?)

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        """Install the hooks; they record from the next forward/backward on."""
        if self.armed:
            return
        self._events = []
        if self.module is not None:
            for name, sub in self.module.named_modules():
                self._handles.append(sub.register_forward_hook(self._forward_hook(name or ROOT)))
        for name, param in zip(self.names, self.params):
            if param.requires_grad:
                self._handles.append(param.register_hook(self._recorder(module_of(name), "param")))

    def disarm(self) -> None:
        """Remove every hook (tensor hooks on activations die with the graph)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def result(self) -> tuple[str, str] | None:
        """(module name, how it was found) of the origin, or None if every recorded gradient was finite.

        Reads the recorded flags in one host transfer, and forgets them.
        """
        events, self._events = self._events, []
        if not events:
            return None
        device = events[0][2].device
        finite = torch.stack([flag.to(device) for _, _, flag in events]).tolist()
        bad_output: set[str] = set()
        first_bad_output = None
        for (name, kind, _), ok in zip(events, finite):
            if ok:
                continue
            if kind == "out":
                bad_output.add(name)
                first_bad_output = first_bad_output or name
            elif name not in bad_output:
                return name, "it received a finite gradient at its output and produced a non-finite one"
        if first_bad_output is None:
            return None
        if ROOT in bad_output or self.module is None:
            return LOSS, "the gradient was already non-finite where backward started (the loss, or an operation after the model)"
        return first_bad_output, "the gradient reaching its output was non-finite: an operation outside the modules, after it, produced it"

    def _recorder(self, name: str, kind: str) -> Callable[[Tensor], None]:
        def record(grad: Tensor) -> None:
            # One flag per firing, kept on the device: no host read inside backward.
            self._events.append((name, kind, torch.isfinite(grad).all()))

        return record

    def _forward_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if not torch.is_grad_enabled():
                return
            for tensor in _tensors(output):
                if tensor.requires_grad:
                    tensor.register_hook(self._recorder(name, "out"))
            for tensor in _tensors(args):
                if tensor.requires_grad and not isinstance(tensor, nn.Parameter):
                    tensor.register_hook(self._recorder(name, "in"))

        return hook


def _tensors(value: object) -> list[Tensor]:
    """Tensors in an output or argument structure (one level of tuple/list/dict)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, Tensor)]
    if isinstance(value, dict):
        return [v for v in value.values() if isinstance(v, Tensor)]
    return []
