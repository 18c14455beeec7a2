"""Gradient accumulation's memory: peak RSS of a training step on batch B at once vs B/K micro-batches.

Each configuration runs in its own fresh process, one after the other, so the
peak resident set (VmHWM) belongs to it alone. The model is a deep,
narrow MLP on a large batch, so that activations (which scale with the
micro-batch) dominate parameters and gradients (which do not): the peak should
fall towards the fixed part as K grows. Reported per K: the whole process's
peak, and what the step adds on top of the process before it (interpreter,
torch, model, data; the peak is reset after start-up). The table's times are the step times, for information (no goal).
"""

from __future__ import annotations

from gradkit.bench.common import Row, Settings
from gradkit.bench.processes import run_workers
from gradkit.bench.timing import summarize

__all__ = ["run"]

FULL = {"sizes": (128,) * 17, "batch": 32768, "ks": (2, 4, 8), "repeats": 3}  # 16 layers, 0.26M params
QUICK = {"sizes": (128,) * 9, "batch": 8192, "ks": (4,), "repeats": 1}
TINY = {"sizes": (16,) * 3, "batch": 64, "ks": (4,), "repeats": 1}
TIMEOUT = 300.0


def run(settings: Settings) -> list[Row]:
    shape = TINY if settings.tiny else QUICK if settings.repeats < 20 else FULL
    results = {k: _child(shape, k) for k in (1, *shape["ks"])}
    full = results[1]
    mib = 1 << 20
    rows = []
    for k in shape["ks"]:
        mine = results[k]
        peak_ratio = mine["peak_bytes"] / full["peak_bytes"]
        added = max(mine["peak_bytes"] - mine["before_bytes"], 1)
        added_full = max(full["peak_bytes"] - full["before_bytes"], 1)
        rows.append(
            Row(
                f"accumulation K={k} vs full batch {shape['batch']}, peak memory, MLP "
                f"{len(shape['sizes']) - 1}x{shape['sizes'][0]}",
                "cpu",
                "full batch (K=1)",
                0.0,  # no time goal: the measure here is memory (note)
                gradkit_time=summarize(mine["times"]),
                reference_time=summarize(full["times"]),
                note=(
                    f"peak RSS {mine['peak_bytes'] / mib:.0f} MiB vs {full['peak_bytes'] / mib:.0f} MiB "
                    f"(ratio {peak_ratio:.3f}); "
                    f"added by the step {added / mib:.0f} MiB vs {added_full / mib:.0f} MiB "
                    f"(ratio {added / added_full:.3f}); "
                    f"process before the step {mine['before_bytes'] / mib:.0f} MiB"
                ),
            )
        )
    return rows


def _child(shape: dict, k: int) -> dict:
    args = [
        "memory", "--sizes", ",".join(map(str, shape["sizes"])), "--batch", str(shape["batch"]),
        "--accumulation", str(k), "--repeats", str(shape["repeats"]),
    ]  # fmt: skip
    return run_workers([(args, {})], TIMEOUT)[0]
