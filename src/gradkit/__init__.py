"""gradkit: control what happens to a gradient between backward() and optimizer.step().

Public names, one per line; see DESIGN.md for the contract.
"""

from gradkit._version import __version__  # first: modules imported below may read it
from gradkit.averaging import EMA
from gradkit.averaging import Average
from gradkit.averaging import FSDPSync
from gradkit.averaging import ModelAverager
from gradkit.clipping import AGC
from gradkit.clipping import AutoClip
from gradkit.clipping import ClipByGlobalNorm
from gradkit.clipping import ClipByValue
from gradkit.clipping import ClipPerLayer
from gradkit.clipping import ClipStage
from gradkit.clipping import ZClip
from gradkit.clipping import clip_grad_norm_
from gradkit.clipping import clip_grad_value_
from gradkit.clipping import grad_norms
from gradkit.compression import BF16
from gradkit.compression import DGC
from gradkit.compression import FP16
from gradkit.compression import QSGD
from gradkit.compression import Compressor
from gradkit.compression import ErrorFeedback
from gradkit.compression import Payload
from gradkit.compression import PowerSGD
from gradkit.compression import RandomK
from gradkit.compression import SignSGD
from gradkit.compression import Threshold
from gradkit.compression import TopK
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
