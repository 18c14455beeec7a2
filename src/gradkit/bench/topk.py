"""Top-k selection: gk.TopK's sampled-threshold fast path against an exact `torch.topk`.

10M float32 entries (a large gradient bucket), density 1%, on ONE thread, so
the ratio is per core and does not depend on how many cores the machine lends
to the process. The fast path must be quicker than the exact top-k it
approximates, and keep almost all of its energy (sum of squares of the kept
entries) with a count close to k; the note reports both. The exact mode
(``gk.TopK(0.01, exact=True)``: torch.topk plus a gather of the values) is the
second row, to show the price of the compressor's bookkeeping around the same call.

`run_cuda` gives the [cuda] twins on one GPU, at 10M and 100M entries: the fast path and
``exactly_k=True`` (exactly k entries from the sampled threshold) against ``torch.topk``
on the same device, each with the energy it keeps.
"""

from __future__ import annotations

import torch

import gradkit
from gradkit.bench import gpu
from gradkit.bench.common import Row, Settings
from gradkit.bench.timing import measure

__all__ = ["run", "run_cuda"]

FULL_NUMEL = 10_000_000
# Above the fast path's minimum sample (16,384 entries), below which it falls back to torch.topk.
TINY_NUMEL = 200_000
DENSITY = 0.01
REFERENCE = "torch.topk(x.abs(), k)"  # no "|": it would split the markdown cell
FAST_GOAL = 5.0
EXACT_GOAL = 0.95  # the exact mode is the same call plus a gather: at most ~5% slower
ENERGY_GOAL = 0.90
COUNT_RANGE = (0.5, 1.5)
MAX_REPEATS = 31  # a full-size torch.topk takes ~0.1 s on one core; more repeats only add time
CUDA_NUMELS = (10_000_000, 100_000_000)
CUDA_TINY_NUMELS = (200_000, 1_000_000)


def run(settings: Settings) -> list[Row]:
    numel = TINY_NUMEL if settings.tiny else FULL_NUMEL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(numel, settings)
    finally:
        torch.set_num_threads(threads)


def _run(numel: int, settings: Settings) -> list[Row]:
    torch.manual_seed(0)
    # Gaussian entries: a smooth magnitude distribution, so the sampled threshold has to be
    # accurate (heavy-tailed real gradients make the energy goal easier, not harder).
    x = torch.randn(numel)
    k = max(1, int(numel * DENSITY))
    fast, exact = gradkit.TopK(DENSITY), gradkit.TopK(DENSITY, exact=True)
    timings = measure(
        {
            "fast": lambda: fast.compress(x),
            "exact": lambda: exact.compress(x),
            "torch": lambda: torch.topk(x.abs(), k, sorted=False),
        },
        warmup=min(settings.warmup, 2),
        repeats=min(settings.repeats, MAX_REPEATS),
    )
    energy, count = _quality(fast, x, k)
    size = f"{numel / 1e6:.0f}M" if numel >= 1e6 else f"{numel / 1e3:.0f}k"
    energy_ok = energy >= ENERGY_GOAL
    count_ok = COUNT_RANGE[0] <= count / k <= COUNT_RANGE[1]
    fast_note = (
        f"1 thread; fast path {timings['fast'].median * 1e3:.1f} ms, torch.topk {timings['torch'].median * 1e3:.1f} ms "
        f"({timings['torch'].median / timings['fast'].median:.2f}x, goal >= {FAST_GOAL:g}x); "
        f"energy kept vs exact top-k {energy:.1%} (goal >= {ENERGY_GOAL:.0%}: {'met' if energy_ok else 'MISSED'}); "
        f"count/k {count / k:.3f} (goal {COUNT_RANGE[0]}-{COUNT_RANGE[1]}: {'met' if count_ok else 'MISSED'}), "
        "medians over 9 calls (the threshold comes from a random sample)"
    )
    return [
        Row(
            f"TopK(0.01) fast path, {size} fp32, 1 thread",
            "cpu",
            REFERENCE,
            FAST_GOAL,
            gradkit_time=timings["fast"],
            reference_time=timings["torch"],
            note=fast_note,
        ),
        Row(
            f"TopK(0.01, exact=True), {size} fp32, 1 thread",
            "cpu",
            REFERENCE,
            EXACT_GOAL,
            gradkit_time=timings["exact"],
            reference_time=timings["torch"],
        ),
    ]


def _quality(compressor: gradkit.TopK, x: torch.Tensor, k: int) -> tuple[float, float]:
    """Median energy kept (relative to the exact top-k) and median count, over several calls:
    the threshold comes from a random sample, so one call could be lucky."""
    best = torch.topk(x.abs(), k, sorted=False).values.double().square().sum()
    energies, counts = [], []
    for _ in range(9):
        payload = compressor.compress(x)
        indices, values = payload.tensors
        valid = payload.meta.get("valid")
        kept = values if valid is None else values[valid]
        if valid is not None:
            # Padding is index 0 with value 0; a valid index must not repeat, or energy would count twice.
            assert indices[valid].unique().numel() == kept.numel()
        energies.append((kept.double().square().sum() / best).item())
        counts.append(float(kept.numel()))
    return _median(energies), _median(counts)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def run_cuda(settings: Settings) -> list[Row]:
    """[cuda] twins: the fast path and exactly_k=True against torch.topk, at 10M and 100M fp32."""
    numels = CUDA_TINY_NUMELS if settings.tiny else CUDA_NUMELS
    labels = {
        numel: (f"TopK(0.01) fast path, {_size(numel)} fp32", f"TopK(0.01, exactly_k=True), {_size(numel)} fp32")
        for numel in numels
    }
    if not gpu.available():
        return gpu.skipped([label for pair in labels.values() for label in pair], REFERENCE, FAST_GOAL)
    rows = []
    for numel in numels:
        rows += _cuda_rows(numel, labels[numel], settings)
        torch.cuda.empty_cache()  # the next size starts from a free device
    return rows


def _cuda_rows(numel: int, labels: tuple[str, str], settings: Settings) -> list[Row]:
    torch.manual_seed(0)
    x = torch.randn(numel, device="cuda")
    k = max(1, int(numel * DENSITY))
    fast, fixed = gradkit.TopK(DENSITY), gradkit.TopK(DENSITY, exactly_k=True)
    timings = gpu.measure_cuda(
        {
            "fast": lambda: fast.compress(x),
            "fixed": lambda: fixed.compress(x),
            "torch": lambda: torch.topk(x.abs(), k, sorted=False),
        },
        settings,
        number=10 if numel < 50_000_000 else 3,
    )
    # Device time alone (the calls replayed from a CUDA graph): what a captured step pays, without launches.
    calls = {"fast": lambda: fast.compress(x), "fixed": lambda: fixed.compress(x)}
    calls["torch"] = lambda: torch.topk(x.abs(), k, sorted=False)
    device = {name: gpu.device_time(fn) for name, fn in calls.items()}
    rows = []
    for name, compressor, label in (("fast", fast, labels[0]), ("fixed", fixed, labels[1])):
        energy, count = _quality(compressor, x, k)
        ratio = timings["torch"].median / timings[name].median
        slots = compressor.compress(x).tensors[0].numel()
        note = (
            f"{gpu.device_name()}; {timings[name].median * 1e3:.3f} ms, "
            f"torch.topk {timings['torch'].median * 1e3:.3f} ms "
            f"({ratio:.2f}x, goal >= {FAST_GOAL:g}x: {'met' if ratio >= FAST_GOAL else 'MISSED'}); "
            f"energy kept vs exact top-k {energy:.1%} (goal >= {ENERGY_GOAL:.0%}: "
            f"{'met' if energy >= ENERGY_GOAL else 'MISSED'}); entries sent/k {count / k:.3f}, "
            f"slots/k {slots / k:.2f}; {_device_note(device[name], device['torch'])}"
        )
        rows.append(Row(label, gpu.device_name(), REFERENCE, FAST_GOAL, timings[name], timings["torch"], note=note))
    return rows


def _device_note(ours: float | None, torch_topk: float | None) -> str:
    if ours is None or torch_topk is None:
        return "device time: not capturable in a CUDA graph"
    return (
        f"device time alone (CUDA graph replay) {ours * 1e3:.3f} ms vs torch.topk {torch_topk * 1e3:.3f} ms "
        f"({torch_topk / ours:.2f}x)"
    )


def _size(numel: int) -> str:
    return f"{numel / 1e6:.0f}M" if numel >= 1e6 else f"{numel / 1e3:.0f}k"
