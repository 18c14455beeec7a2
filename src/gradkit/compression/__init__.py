"""Sparse gradients: compressors and error feedback.

- `base`: the `Compressor` interface and `Payload`.
- `sparsify`: `TopK` (sampled threshold), `RandomK`, `Threshold`.
- `selection`: choosing large entries with no host sync (sampled threshold, fixed-size buffers, exactly k).
- `dgc`: Deep Gradient Compression.
- `quantize`: `FP16`, `BF16`, `QSGD`, `SignSGD`.
- `powersgd`: low-rank `PowerSGD`.
- `error_feedback`: `ErrorFeedback`, residual memory keyed by parameter name.

How payloads meet across ranks (all-reduce for linear ones, all-gather otherwise) is
`gradkit.averaging.payloads`.
"""

from gradkit.compression.base import Compressor, Payload
from gradkit.compression.dgc import DGC
from gradkit.compression.error_feedback import ErrorFeedback
from gradkit.compression.powersgd import PowerSGD
from gradkit.compression.quantize import BF16, FP16, QSGD, SignSGD
from gradkit.compression.sparsify import RandomK, Threshold, TopK

__all__ = [
    "BF16",
    "DGC",
    "FP16",
    "QSGD",
    "Compressor",
    "ErrorFeedback",
    "Payload",
    "PowerSGD",
    "RandomK",
    "SignSGD",
    "Threshold",
    "TopK",
]
