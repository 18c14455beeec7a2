"""Training quality under compression: the same training run dense, with TopK 1% + error feedback, and with DGC 0.1%.

The built-in training engine (`gradkit.train`: a small character-level
transformer) runs three times on 2 local workers with the same seed, data order
and step count; only the compressor differs. The setting is the one of the DGC
paper's comparisons: momentum SGD (0.9; for DGC the momentum moves into the
compressor, with momentum correction), a cosine learning-rate decay, DGC's
density warm-up over the first 2.5% of the steps; sparse values travel as
float16 next to int32 indices. Dense and TopK clip the averaged gradient to a
global norm of 1; DGC clips each rank's gradient before compression (to
1/sqrt(2) on each of the 2 ranks), as its paper does: a clip after compression
would scale the sparse accumulated update, whose norm is not a gradient's.

Many small steps: each worker computes one micro-batch of 4 windows of 64
characters per step, for 40,000 steps. Error feedback sends a coordinate's
accumulated gradient only when it wins the selection, on average once every
1/density steps (100 at 1%, 1000 at 0.1%), and the gap to dense shrinks as the
run sends each coordinate more often: ~400 times at 1% and ~40 at 0.1% here,
against ~30 and ~3 with 3000 steps of 2x16 windows per worker (RESULTS.md has
both). Small steps are also where compression pays: little compute per byte
sent. The learning rate, 0.5, is the highest tried at which dense training
stays stable at this batch (at 1.0, the large steps' rate, the dense run blew
up after ~7000 steps); dense ends at the same loss at 0.25, but DGC, whose
sparse updates move each coordinate rarely, ends 3.3% above it there
(RESULTS.md).

The text is CPython's own standard library source (the .py files next to the
running interpreter, tests left out, about 12 million characters; no
download). The run reads about 20 million characters, about twice the
training part; validation is on the last 10% of the modules, which training
never reads. (The 0.47M-character corpus of
`gradkit demo` is memorized within a few thousand steps; sparse updates then
overfit less than dense ones and look better than they are.)

Reported: the final validation loss relative to the dense run (goal: at most
1% above it; below is better) and the bytes this rank sent, dense /
compressed, over the whole run (warm-up included) and in the last step logged.
The table's times are the training loop's wall time per step, one run each (no
spread); they carry no goal. Rank 0's progress bar shows on stderr.
"""

from __future__ import annotations

import json
import sys
import sysconfig
import tempfile
from pathlib import Path

from gradkit.bench.common import Row, Settings
from gradkit.bench.processes import free_port, run_workers
from gradkit.bench.timing import Timing

__all__ = ["run"]

FULL_STEPS = 40_000  # 28-40 ms per step on 2 cores: about 66 minutes for the three runs
QUICK_STEPS = 4
LOSS_GOAL = 0.01  # final validation loss at most 1% above dense
DGC_BYTES_GOAL = 100.0
# (label, compressor, what its run changes): DGC clips locally, before compression, as its paper does
CASES = (
    ("TopK(0.01) + error feedback", "topk", {"density": 0.01}),
    ("DGC(0.001), local clipping", "dgc", {"density": 0.001, "clip": "local"}),
)
# What every run shares (TrainConfig fields): momentum SGD with a cosine decay, as in DGC's comparisons.
TRAINING = {
    "optimizer": "sgd", "lr": 0.5, "momentum": 0.9, "schedule": "cosine", "clip": "global", "max_norm": 1.0,
    "sparse_values": "float16", "dgc_warmup": 0.025, "micro_batch": 4, "accumulation_steps": 1,
}  # fmt: skip
EVAL_BATCHES = 128  # of micro_batch windows: 512 validation windows, 32K characters
FULL_TEXT_CHARS = 12_000_000
QUICK_TEXT_CHARS = 200_000
SECONDS_PER_STEP = 0.1  # a generous bound per run and step (measured: 0.028-0.04 s on 2 cores, FULL_STEPS)
TINY_MODEL = {"width": 16, "layers": 1, "context": 16, "micro_batch": 4, "eval_batches": 1}


def run(settings: Settings) -> list[Row]:
    quick = settings.tiny or settings.repeats < 20  # --quick: only check that it runs
    steps = settings.quality_steps or (2 if settings.tiny else QUICK_STEPS if quick else FULL_STEPS)
    shape = TINY_MODEL if settings.tiny else {"eval_batches": 2} if quick else {"eval_batches": EVAL_BATCHES}
    names = ("none",) + tuple(compressor for _, compressor, _ in CASES)
    with tempfile.TemporaryDirectory(prefix="gradkit-quality-") as run_dir:
        text = write_source_corpus(Path(run_dir, "stdlib.txt"), QUICK_TEXT_CHARS if quick else FULL_TEXT_CHARS)
        configs = [
            dict(
                name=compressor, run_dir=run_dir, steps=steps, workers=2, seed=0, compressor=compressor,
                text=str(text), **{**TRAINING, **shape, **changes},
                # evaluate and checkpoint only at the end; track every 10 steps (it logs the bytes per step)
                eval_every=10**9, checkpoint_every=10**9, track_every=10,
            )
            for compressor, changes in (("none", {}),) + tuple((c, changes) for _, c, changes in CASES)
        ]  # fmt: skip
        config_file = Path(run_dir, "configs.json")
        config_file.write_text(json.dumps(configs))
        # The engine itself (what `gradkit train` runs on each worker), three runs in one
        # 2-process group: one start-up instead of three launches.
        init = f"tcp://127.0.0.1:{free_port()}"
        commands = [
            (
                ["quality", "--rank", str(rank), "--world", "2", "--init", init, "--configs", str(config_file)],
                {"GLOO_SOCKET_IFNAME": "lo"},
            )
            for rank in (0, 1)
        ]
        print(
            f"quality: {len(configs)} training runs of {steps} steps, one after the other ({', '.join(names)})",
            file=sys.stderr,
            flush=True,
        )
        summaries = run_workers(commands, 300 + len(configs) * steps * SECONDS_PER_STEP, show=0)[0]
        results = {}
        for compressor, summary in zip(names, summaries):
            summary["last_bytes"] = _last_step_bytes(Path(run_dir) / compressor)
            results[compressor] = summary
    dense = results["none"]
    dense_time = _per_step(dense)
    rows = []
    for label, compressor, _ in CASES:
        mine = results[compressor]
        rows.append(
            Row(
                f"training quality: {label} vs dense, char LM on stdlib source, {steps} steps, 2 workers",
                "cpu",
                "dense Average()",
                0.0,  # no time goal: the goals of this row are quality and bytes (note)
                gradkit_time=_per_step(mine),
                reference_time=dense_time,
                note=_note(compressor, mine, dense, quick),
            )
        )
    return rows


def _note(compressor: str, mine: dict, dense: dict, quick: bool) -> str:
    loss_ratio = mine["val_loss"] / dense["val_loss"]
    total_ratio = dense["bytes_sent"] / max(mine["bytes_sent"], 1)
    dense_per_step = dense["bytes_sent"] / dense["steps"]
    last_step, last = mine["last_bytes"] or (None, None)
    last_ratio = f"{dense_per_step / last:.0f}x in the last logged step ({last_step})" if last else "no logged step"
    loss_verdict = "not judged: --quick" if quick else "met" if loss_ratio <= 1 + LOSS_GOAL else "MISSED"
    text = (
        f"final validation loss {mine['val_loss']:.4f} vs dense {dense['val_loss']:.4f} (ratio {loss_ratio:.4f}, "
        f"goal at most {LOSS_GOAL:.0%} above: {loss_verdict}; start {dense['first_val_loss']:.3f}); "
        f"final training loss {mine['train_loss']:.4f} vs dense {dense['train_loss']:.4f}; "
        f"bytes sent dense/compressed {total_ratio:.1f}x over the run, {last_ratio}"
    )
    if compressor == "dgc":
        verdict = "not judged: --quick" if quick else "met" if total_ratio >= DGC_BYTES_GOAL else "MISSED"
        text += f" (goal >= {DGC_BYTES_GOAL:g}x over the run: {verdict})"
    return text


def write_source_corpus(path: Path, max_chars: int) -> Path:
    """CPython's standard library source (tests left out), in a fixed order, up to `max_chars` characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not {"test", "tests", "site-packages"} & set(p.relative_to(root).parts)
    )
    parts, total = [], 0
    for file in files:
        if total >= max_chars:
            break
        part = file.read_text(encoding="utf-8", errors="replace")
        parts.append(part)
        total += len(part) + 1
    if total < 10_000:
        raise RuntimeError(
            f"found only {total} characters of Python source under {root}; the quality benchmark needs the standard "
            "library's .py files"
        )
    path.write_text("\n".join(parts)[:max_chars], encoding="utf-8")
    return path


def _per_step(summary: dict) -> Timing:
    seconds = summary["seconds"] / max(summary["steps"], 1)
    return Timing(seconds, seconds, seconds)  # one run: no spread to report


def _last_step_bytes(run_path: Path) -> tuple[int, int] | None:
    """(step, bytes rank 0 sent in it) of the last logged step, from the tracker's JSONL."""
    path = run_path / "tracking.jsonl"
    if not path.exists():
        return None
    last = None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        sent = record.get("global", {}).get("bytes_sent") if isinstance(record.get("global"), dict) else None
        if sent is not None:
            last = (record.get("step"), sent)
    return last
