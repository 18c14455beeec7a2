"""Compressors' memory and step time on one process: peak RSS over dense `gk.Average()`, in B/param.

Each configuration trains a few steps of a ~20M-parameter MLP (five 2000x2000
layers, a batch of 8, so that activations are negligible beside the parameters)
through ``GradientPipeline(average=gk.Average(compressor))`` in a fresh process of
its own, one after the other, so that its peak resident set (VmHWM, reset after
the model and the data exist) is its own. What a compressor holds over dense
(error-feedback residual, DGC's momentum and velocity, PowerSGD's factors and
residual, and the step's temporaries) is its peak minus dense's, per parameter.
The step time is ``pipe.step`` (reduction, compression, optimizer step), the
median of the timed steps, against dense's measured the same way.

    python -m gradkit.bench.ef_memory --child NAME --layers 5 --width 2000 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from gradkit.bench.common import Row, Settings
from gradkit.bench.processes import same_gradkit_env
from gradkit.bench.timing import summarize
from gradkit.bench.worker import proc_status, reset_peak

__all__ = ["run", "CONFIGS"]

# name -> the compressor expression (evaluated in the child, with gk and torch in scope); None: dense
CONFIGS = {
    "dense": None,
    "TopK(0.01) + EF fp32": "gk.TopK(0.01)",
    "TopK(0.01) + EF bf16": "gk.ErrorFeedback(gk.TopK(0.01), residual_dtype=torch.bfloat16)",
    "TopK(0.01, exactly_k) + EF fp32": "gk.TopK(0.01, exactly_k=True)",
    "DGC(0.01)": "gk.DGC(0.01)",
    "PowerSGD(2)": "gk.PowerSGD(2)",
}
GOALS = {"TopK(0.01) + EF fp32"}  # the goals: at most +5 B/param, a step at most 1.5x dense
FULL = {"layers": 5, "width": 2000, "steps": 8}  # 20.0M parameters
QUICK = {"layers": 5, "width": 2000, "steps": 4}
TINY = {"layers": 2, "width": 200, "steps": 2}
TIMEOUT = 600.0


def run(settings: Settings) -> list[Row]:
    shape = TINY if settings.tiny else QUICK if settings.repeats < 20 else FULL
    results = {name: _child(name, shape) for name in CONFIGS}
    dense = results["dense"]
    params = dense["params"]
    rows = []
    for name, mine in results.items():
        if name == "dense":
            continue
        over = (mine["peak_bytes"] - dense["peak_bytes"]) / params
        between = (mine["after_bytes"] - dense["after_bytes"]) / params
        rows.append(
            Row(
                f"one-process step memory, {name} vs dense Average(), {params / 1e6:.1f}M params",
                "cpu",
                "dense Average()",
                1 / 1.5 if name in GOALS else 0.0,  # the step at most 1.5x dense (TopK 1%; the others: information)
                gradkit_time=summarize(mine["times"]),
                reference_time=summarize(dense["times"]),
                note=(
                    f"peak RSS {over:+.2f} B/param over dense{' (goal: <= +5)' if name in GOALS else ''}; "
                    f"held between steps {between:+.2f} B/param; "
                    f"peak {mine['peak_bytes'] / 2**20:.0f} MiB vs {dense['peak_bytes'] / 2**20:.0f} MiB"
                ),
            )
        )
    return rows


def _child(name: str, shape: dict) -> dict:
    command = [
        sys.executable, "-m", "gradkit.bench.ef_memory", "--child", name,
        "--layers", str(shape["layers"]), "--width", str(shape["width"]), "--steps", str(shape["steps"]),
    ]  # fmt: skip
    env = {**same_gradkit_env(os.environ), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"ef_memory child {name!r} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(name: str, layers: int, width: int, steps: int) -> dict:
    """Train `steps` steps under the configuration `name`; peak and held RSS, step times."""
    import torch
    from torch import nn

    import gradkit as gk

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    expression = CONFIGS[name]
    compressor = eval(expression, {"gk": gk, "torch": torch}) if expression else None  # noqa: S307 (a fixed table)
    pipe = gk.GradientPipeline(model, average=gk.Average(compressor))
    x, y = torch.randn(8, width), torch.randn(8, width)
    params = sum(p.numel() for p in model.parameters())
    reset_peak()
    times = []
    for _ in range(steps):
        pipe.backward(nn.functional.mse_loss(model(x), y))
        start = time.perf_counter()
        pipe.step(optimizer)
        times.append(time.perf_counter() - start)
    return {
        "params": params,
        "peak_bytes": proc_status("VmHWM"),
        "after_bytes": proc_status("VmRSS"),
        "times": times[1:],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=list(CONFIGS), required=True)
    parser.add_argument("--layers", type=int, default=FULL["layers"])
    parser.add_argument("--width", type=int, default=FULL["width"])
    parser.add_argument("--steps", type=int, default=FULL["steps"])
    args = parser.parse_args()
    result = child(args.child, args.layers, args.width, args.steps)
    print(json.dumps({**result, "median_step_s": statistics.median(result["times"])}))
