"""Parameter EMA: gk.EMA.update against torch's AveragedModel.update_parameters, and against a plain copy.

The model has GPT-2 small's 148 parameter tensors (124M fp32, the issue's
"100M-parameter model"). All averages use the same decay without warmup and
are timed interleaved in this process. torch offers two EMA recipes, and each
is a row:

- ``AveragedModel(model, avg_fn=get_ema_avg_fn(d))``: a function per tensor
  that returns a new tensor, copied back (the form torchvision's
  ``ExponentialMovingAverage`` uses);
- ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d))``: one
  ``_foreach_lerp_`` per (device, dtype) group, the same kernel gk.EMA runs.

The update streams over the bytes three times (reads the average and the
model, writes the average); a copy of the parameters (two passes) shows what
the memory allows.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

import gradkit
from gradkit.bench.clipping import GPT2_SMALL, TINY, gpt2_shapes
from gradkit.bench.common import Row, Settings
from gradkit.bench.timing import measure

__all__ = ["run"]

REFERENCE = "AveragedModel.update_parameters"
GOAL = 2.0
DECAY = 0.999
PASSES = 3
MAX_REPEATS = 31  # each call streams ~1.5 GB at full size


class _Weights(nn.Module):
    """A bag of parameters of the given shapes: what the averages see of a model."""

    def __init__(self, shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(shape) * 0.02) for shape in shapes)


def run(settings: Settings) -> list[Row]:
    torch.manual_seed(0)
    shapes = gpt2_shapes(**(TINY if settings.tiny else GPT2_SMALL))
    model = _Weights(shapes)
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    ema = gradkit.EMA(model, decay=DECAY, warmup=False)
    references = {
        "avg_fn=get_ema_avg_fn": AveragedModel(model, avg_fn=get_ema_avg_fn(DECAY)),
        "multi_avg_fn=get_ema_multi_avg_fn": AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY)),
    }
    for reference in references.values():
        reference.update_parameters(model)  # the first call copies; later ones average
    scratch = [p.detach().clone() for p in params]
    candidates = {"gradkit": ema.update, "copy": lambda: torch._foreach_copy_(scratch, [p.detach() for p in params])}
    candidates.update({name: (lambda r=r: r.update_parameters(model)) for name, r in references.items()})
    timings = measure(candidates, repeats=min(settings.repeats, MAX_REPEATS), warmup=min(settings.warmup, 3))
    size = f"{numel / 1e3:.0f}k" if numel < 1e6 else f"{numel / 1e6:.1f}M"
    label = "tiny GPT-2" if settings.tiny else "GPT-2 small"
    rows = []
    for name, reference in references.items():
        errors = [(a - b).abs().max().item() for a, b in zip(ema.module.parameters(), reference.module.parameters())]
        ratio = timings[name].median / timings["gradkit"].median
        note = (
            f"EMA.update vs AveragedModel({name}({DECAY})).update_parameters: {ratio:.2f}x "
            f"(goal >= {GOAL:g}x: {'met' if ratio >= GOAL else 'MISSED'}); "
            f"max |difference| of the averages after all calls {max(errors):.1e} (fp32); "
            f"{torch.get_num_threads()} torch threads"
        )
        rows.append(
            Row(
                f"EMA.update, {label} shapes ({size} fp32, {len(shapes)} tensors)",
                "cpu",
                f"{REFERENCE} ({name})",
                GOAL,
                gradkit_time=timings["gradkit"],
                reference_time=timings[name],
                copy_time=timings["copy"],
                passes=PASSES,
                note=note,
            )
        )
    return rows
