"""gradkit's callback on the real transformers.Trainer, with a tiny random-init GPT-2 (nothing is downloaded)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import gradkit as gk
from dist_helpers import run_torchrun
from gradkit.integrations.huggingface import GradkitCallback
from gradkit.tracking.report import load_run
from gradkit.tracking.writers import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
hf_logging.set_verbosity_error()


def tokens(n: int = 48, vocab: int = 16) -> list[dict]:
    rows = torch.randint(0, vocab, (n, 16), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": r, "labels": r} for r in rows]


def train(tmp_path, callback=None, *, steps: int = 6, optimizers=None, **overrides):
    """Train the tiny GPT-2; `optimizers(model)`, if given, returns the (optimizer, scheduler) to use."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    settings = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": steps,
                "logging_steps": 1, "report_to": [], "save_strategy": "no", "use_cpu": True, "seed": 0,
                "disable_tqdm": True}  # fmt: skip
    args = TrainingArguments(str(tmp_path / "out"), **{**settings, **overrides})
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tokens(),
        callbacks=[callback] if callback else None,
        optimizers=optimizers(model) if optimizers else (None, None),
    )
    trainer.train()
    return model, trainer


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("precision", [{}, {"bf16": True}], ids=["fp32", "bf16"])
def test_tracking_changes_nothing_and_matches_the_trainer_norm(tmp_path, precision):
    plain, _ = train(tmp_path, max_grad_norm=0.5, **precision)
    tracker = gk.Tracker(tmp_path / "run", every=1)
    tracked, trainer = train(tmp_path, GradkitCallback(tracker), max_grad_norm=0.5, **precision)
    assert same(plain, tracked)  # bit-identical, the Trainer's clipping included
    assert trainer.args.max_grad_norm == 0.5  # restored after training
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    ours = [r["global"]["norm_pre_clip"] for r in tracker.history]
    assert len(ours) == len(logged) == 6
    for a, b in zip(ours, logged):
        assert abs(a - b) <= 1e-5 * b
    assert any(n > 0.5 for n in ours)  # pre-clip: the tracker saw the gradient before the Trainer's clip
    assert any(r["global"]["clip_coef"] < 1 for r in tracker.history)
    assert "gradkit/grad_norm/transformer.h.0" in trainer.state.log_history[0]
    assert trainer.state.log_history[0]["gradkit/grad_norm"] == pytest.approx(logged[0], rel=1e-5)


def test_a_training_that_raised_gives_max_grad_norm_back_on_the_next(tmp_path):
    # The Trainer calls on_train_end only when training ends well: after an error (an OOM, a KeyboardInterrupt in
    # a notebook) the retry must still clip at the user's max_grad_norm, and give it back at its end.
    from transformers import TrainerCallback

    class FailsOnce(TrainerCallback):
        def __init__(self) -> None:
            self.armed = True

        def on_step_end(self, args, state, control, **kwargs):
            if self.armed and state.global_step == 2:
                self.armed = False
                raise KeyboardInterrupt

    def fail_then_retry(*callbacks):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
        args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                 max_steps=4, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                                 disable_tqdm=True, max_grad_norm=0.05)  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=tokens(), callbacks=[*callbacks, FailsOnce()])
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
        trainer.train()  # the retry, on the weights the failed run left
        return model, args

    reference, _ = fail_then_retry()
    tracker = gk.Tracker(None, every=1)
    tracked, args = fail_then_retry(GradkitCallback(tracker))
    assert args.max_grad_norm == 0.05  # given back after the retry
    assert all(r["global"]["clip_coef"] < 1 for r in tracker.history[-4:])  # the retry's steps were clipped ...
    assert same(reference, tracked)  # ... as the Trainer alone clips them: bit-identical


def test_a_max_grad_norm_set_after_a_failed_training_is_the_users():
    # After a training that raised, the user may lower max_grad_norm before retrying: that value is theirs, not
    # the one the callback had taken over (the callback's hooks called as the Trainer calls them).
    import types

    callback = GradkitCallback(gk.Tracker(None))
    args = types.SimpleNamespace(max_grad_norm=1.0, gradient_accumulation_steps=1)
    model = torch.nn.Linear(3, 2)
    callback.on_train_begin(args, None, None, model=model)
    assert args.max_grad_norm == 0.0  # taken over; the training then raises: no on_train_end
    args.max_grad_norm = 0.25
    callback.on_train_begin(args, None, None, model=model)
    callback.on_train_end(args, None, None)
    assert args.max_grad_norm == 0.25


def test_gradkit_clipping_equals_the_trainer_max_grad_norm(tmp_path):
    reference, _ = train(tmp_path, max_grad_norm=0.3)
    ours, _trainer = train(tmp_path, GradkitCallback(clip=gk.ClipByGlobalNorm(0.3)), max_grad_norm=0.0)
    unclipped, _ = train(tmp_path, max_grad_norm=0.0)
    assert not same(reference, unclipped)
    for a, b in zip(reference.parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_clip_replaces_a_set_max_grad_norm(tmp_path):
    # max_grad_norm=1e-3 would change the result if the Trainer still clipped on top of gradkit's stage.
    reference, _ = train(tmp_path, GradkitCallback(clip=gk.ClipByGlobalNorm(0.3)), max_grad_norm=0.0)
    replaced, trainer = train(tmp_path, GradkitCallback(clip=gk.ClipByGlobalNorm(0.3)), max_grad_norm=1e-3)
    assert same(reference, replaced)
    assert trainer.args.max_grad_norm == 1e-3


def test_one_callback_follows_a_new_model_of_the_same_shape(tmp_path):
    # A hyperparameter search (Trainer(model_init=...)) trains a fresh model of the same architecture with the
    # same callback: its clip stage must act on the new model's gradients, not on the first model's, and its
    # tracker (closed when the first training ended) writes the second run after the first in the same log.
    tracker = gk.Tracker(tmp_path / "run", every=1)
    callback = GradkitCallback(tracker, clip=gk.ClipByGlobalNorm(0.3))
    first, _ = train(tmp_path, callback, max_grad_norm=0.0)
    second, _ = train(tmp_path, callback, max_grad_norm=0.0)
    reference, _ = train(tmp_path, max_grad_norm=0.3)
    assert callback.boundary.params[0] is next(second.parameters())
    for a, b in zip(reference.parameters(), second.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    lines = read_jsonl(tmp_path / "run" / "tracking.jsonl")
    assert [(line["type"], line.get("step")) for line in lines] == 2 * [
        ("run", None),
        *(("step", s) for s in range(1, 7)),
    ]
    names = [name for name, _ in first.named_parameters()]
    assert lines[0]["params"] == lines[7]["params"] == names == [name for name, _ in second.named_parameters()]
    assert all(list(line["params"]) == names for line in lines if line["type"] == "step")
    # The second run's records are of the second model, clipped by a stage that started afresh.
    assert lines[8]["global"]["norm_pre_clip"] == pytest.approx(lines[1]["global"]["norm_pre_clip"], rel=1e-6)
    with pytest.warns(RuntimeWarning, match="the steps start over at step 1 after step 6"):
        header, records, _ = load_run(tmp_path / "run")
    assert header["params"] == names and [r["step"] for r in records] == list(range(1, 7))


def test_a_new_model_starts_the_clip_stages_afresh(tmp_path):
    # ZClip's norm history belongs to the model it saw: a hyperparameter search's second trial must clip exactly
    # as a fresh callback would, not against the first trial's norms.
    reused = GradkitCallback(clip=gk.ZClip(warmup=4, z_thresh=0.5))
    train(tmp_path, reused, max_grad_norm=0.0)
    second, _ = train(tmp_path, reused, max_grad_norm=0.0)
    fresh, _ = train(tmp_path, GradkitCallback(clip=gk.ZClip(warmup=4, z_thresh=0.5)), max_grad_norm=0.0)
    # The norms fall over a run (1.89 -> 1.71 in the warm-up): against the first model's history, the second
    # model's first norms are spikes and get clipped; a fresh ZClip does not clip them.
    assert same(second, fresh)
    assert reused.clip[0].state_dict()["count"] == 6  # the second model's steps only


def mean_loss(model) -> float:
    """The model's loss on the whole training set, dropout off (a finite number or nan/inf)."""
    ids = torch.stack([row["input_ids"] for row in tokens()])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def spiked_run(tmp_path, callback=None, *, factor: float):
    # SGD at lr 1 converges on this task; `factor` multiplies the learning rate for optimizer steps 31-33,
    # as a restart or a mis-set warm-up would (after ZClip's 25 warm-up steps). Returns the final model,
    # the loss of the model before training, and the Trainer's logged losses.
    torch.manual_seed(0)
    start = mean_loss(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)))
    spike = range(30, 33)  # LambdaLR counts from 0: its step 30 is the Trainer's step 31

    def optimizers(model):
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        return sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: factor if step in spike else 1.0)

    settings = {"max_grad_norm": 0.0, "per_device_train_batch_size": 8}
    model, trainer = train(tmp_path, callback, steps=60, optimizers=optimizers, **settings)
    return model, start, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_zclip_rescues_a_run_from_a_learning_rate_spike(tmp_path):
    reference, start, _ = spiked_run(tmp_path, factor=1.0)
    spiked, _, spiked_log = spiked_run(tmp_path, factor=5.0)
    rescued, _, rescued_log = spiked_run(tmp_path, GradkitCallback(clip=gk.ZClip()), factor=5.0)
    converged, blown, kept = mean_loss(reference), mean_loss(spiked), mean_loss(rescued)
    assert converged < start - 1.0  # the task is learnable at lr 1 (about 4.2 -> 2.8)
    # Without clipping the three large steps throw the model off and it never comes back (measured: 9e12).
    assert max(spiked_log) > 1e3
    assert not math.isfinite(blown) or blown > 10 * start
    # With ZClip the spike still hits (the first large step uses an ordinary gradient), then the run recovers.
    assert max(rescued_log[31:36]) > max(rescued_log[25:31]) + 1.0
    assert kept < start - 1.0
    assert abs(kept - converged) < 0.1  # measured: 0.02


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="clip must be a gradkit clip stage"):
        GradkitCallback(clip=1.0)
    with pytest.raises(TypeError, match="tracker must have wants"):
        GradkitCallback(tracker=object())


def test_missing_packages_name_the_extra():
    code = (
        "import sys; sys.modules['transformers'] = None; sys.modules['lightning'] = None\n"
        "sys.modules['accelerate'] = None\n"
        "import gradkit.integrations\n"  # the package itself needs none of them
        "for name, extra in (('huggingface', 'hf'), ('lightning', 'lightning'), ('accelerate', 'accelerate')):\n"
        "    try:\n"
        "        __import__('gradkit.integrations.' + name)\n"
        "    except ImportError as e:\n"
        "        assert f'pip install gradkit[{extra}]' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('no error for ' + name)\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def _run(*args: str, timeout: float = 300) -> str:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = run_torchrun([sys.executable, *args], timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_example_runs_and_gradkit_report_reads_it(tmp_path):
    run_dir = tmp_path / "run"
    out = _run(str(ROOT / "examples" / "hf_trainer.py"), "--steps", "10", "--log-dir", str(run_dir))
    assert re.search(r"rank 0: done, loss [\d.]+", out)
    _run("-m", "gradkit", "report", str(run_dir))
    assert (run_dir / "report.html").exists()


def test_example_under_torchrun_two_processes(tmp_path):
    out = _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "examples" / "hf_trainer.py"), "--steps", "6",
               "--log-dir", str(tmp_path / "run"))  # fmt: skip
    checksums = re.findall(r"rank (\d): done, loss [\d.]+, checksum (-?\d+\.\d{6})", out)
    assert sorted(rank for rank, _ in checksums) == ["0", "1"], out
    assert checksums[0][1] == checksums[1][1]  # ZClip scaled both replicas the same
    assert (tmp_path / "run" / "tracking.jsonl").exists()
