"""Cost of gradkit's Hugging Face callback: Trainer steps with GradkitCallback(Tracker(every=10)) against without.

A random-init GPT-2 (4 layers, n_embd 256, vocab 1024, 64-token rows, batch 8, accumulation 2; about
3.4M parameters; nothing downloaded) trained by ``transformers.Trainer`` on CPU. A sample is one
``trainer.train()`` of 10 optimizer steps (one logging period of the tracker, so one logged step),
the two trainers interleaved. ``train()``'s own setup (dataloader, optimizer) is inside both samples.
Goal: the callback adds at most 5% to the step time.
"""

from __future__ import annotations

import os
import tempfile

import torch

import gradkit
from gradkit.bench.common import Row, Settings
from gradkit.bench.timing import measure

__all__ = ["run"]

GOAL = 0.95
STEPS = 10  # = Tracker(every=10): one logged step per sample
MAX_REPEATS = 11


def _trainer(callback, out_dir: str, tiny: bool):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    width, layers = (32, 2) if tiny else (256, 4)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=1024, n_positions=64, n_embd=width, n_layer=layers, n_head=4))
    rows = torch.randint(0, 1024, (8 * 2 * STEPS, 64), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(out_dir, per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=STEPS,
                             logging_steps=STEPS, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback] if callback else None)
    return trainer, sum(p.numel() for p in model.parameters())


def run(settings: Settings) -> list[Row]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    label = "HF Trainer step + GradkitCallback(Tracker(every=10))"
    try:
        from transformers.utils import logging as hf_logging

        from gradkit.integrations.huggingface import GradkitCallback
    except ImportError as error:
        return [Row(label, "cpu", "Trainer without callback", GOAL, note=f"skipped: {error}")]
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        callback = GradkitCallback(gradkit.Tracker(f"{tmp}/run", every=STEPS))
        with_cb, numel = _trainer(callback, f"{tmp}/a", settings.tiny)
        without, _ = _trainer(None, f"{tmp}/b", settings.tiny)
        timings = measure({"gradkit": with_cb.train, "reference": without.train},
                          warmup=min(settings.warmup, 2), repeats=min(settings.repeats, MAX_REPEATS))  # fmt: skip
        callback.close()
    g, r = timings["gradkit"].median / STEPS, timings["reference"].median / STEPS
    return [Row(f"{label}, GPT-2 {numel / 1e6:.1f}M params", "cpu", "Trainer without callback", GOAL,
                gradkit_time=timings["gradkit"], reference_time=timings["reference"],
                note=f"HF callback: {g * 1e3:.1f} ms/step with, "
                     f"{r * 1e3:.1f} ms/step without ({g / r - 1:+.1%})")]  # fmt: skip


if __name__ == "__main__":
    import sys

    quick = "--quick" in sys.argv
    for row in run(Settings(warmup=1 if quick else 2, repeats=3 if quick else 11)):
        print(row.benchmark, f"ratio {row.ratio:.3f}" if not row.skipped else "", row.note)
