"""A number as a 0-d tensor on a device, without a host sync.

``torch.tensor(x, device=cuda)`` and ``torch.as_tensor(x, device=cuda)`` of a Python number copy it from
pageable host memory, which waits for the stream; ``torch.full`` fills the tensor on the device instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["on_device"]


def on_device(
    value: float | Tensor, device: torch.device, dtype: torch.dtype | None = None, *, copy: bool = False
) -> Tensor:
    """`value` (a Python number or a tensor) as a 0-d tensor on `device`, in `dtype` if given; no host sync.

    Args:
        value: a number, or a tensor (moved and cast as needed).
        device, dtype: where and as what (None: the tensor's own dtype, or torch's default for the number).
        copy: a new tensor even when `value` is already a tensor there (e.g. to reduce it in place).

    Example:
        >>> on_device(4, torch.device("cpu"), torch.float64)
        tensor(4., dtype=torch.float64)
    """
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype, copy=copy)
    return torch.full((), value, dtype=dtype, device=device)
