"""Numbers and host values on a device, without a host sync.

``torch.tensor(x, device=cuda)`` and ``torch.as_tensor(x, device=cuda)`` of a Python number copy it from
pageable host memory, which waits for the stream; ``torch.full`` fills the tensor on the device instead, and a
list of host values goes through pinned memory with a non-blocking copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["from_host", "on_device"]


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


def from_host(values: Sequence[float] | Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """Host values (a list, or a CPU tensor) as a tensor on `device`, in `dtype` if given, without a wait: a
    pinned, non-blocking copy on CUDA.

    Example:
        >>> from_host([3, 1, 2], torch.device("cpu"), torch.int64)
        tensor([3, 1, 2])
    """
    host = values.to(dtype) if isinstance(values, Tensor) else torch.tensor(values, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
