"""gradkit: control what happens to a gradient between backward() and optimizer.step().

Public names, one per line; see DESIGN.md for the contract.
"""

from gradkit._version import __version__  # first: modules imported below may read it
from gradkit.averaging import EMA, Average, FSDPSync, ModelAverager
from gradkit.clipping import (
    AGC,
    AutoClip,
    ClipByGlobalNorm,
    ClipByValue,
    ClipPerLayer,
    ClipStage,
    ZClip,
    clip_grad_norm_,
    clip_grad_value_,
    grad_norms,
)
from gradkit.compression import (
    BF16,
    DGC,
    FP16,
    QSGD,
    Compressor,
    ErrorFeedback,
    Payload,
    PowerSGD,
    RandomK,
    SignSGD,
    Threshold,
    TopK,
)
from gradkit.context import GradContext
from gradkit.distributed import CollectiveError
from gradkit.integrations import ddp_comm_hook
from gradkit.pipeline import GradientPipeline
from gradkit.step_report import StepReport
from gradkit.tracking import Tracker

__all__ = [
    "BF16",
    "DGC",
    "FP16",
    "QSGD",
    "Compressor",
    "ErrorFeedback",
    "FSDPSync",
    "Payload",
    "PowerSGD",
    "RandomK",
    "SignSGD",
    "Threshold",
    "TopK",
    "AGC",
    "Average",
    "AutoClip",
    "ClipByGlobalNorm",
    "ClipByValue",
    "ClipPerLayer",
    "ClipStage",
    "CollectiveError",
    "EMA",
    "GradContext",
    "GradientPipeline",
    "ModelAverager",
    "StepReport",
    "Tracker",
    "ZClip",
    "__version__",
    "clip_grad_norm_",
    "clip_grad_value_",
    "ddp_comm_hook",
    "grad_norms",
]
