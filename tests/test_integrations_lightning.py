"""gradkit's Lightning callback on the real lightning.Trainer: tracking changes nothing, clipping equals Lightning's.

Run as a script (``python tests/test_integrations_lightning.py --devices 2``) it fits the same model with
several callback settings under the DDP strategy and prints one checksum line per setting and rank.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("lightning")
import lightning as L

import gradkit as gk
from dist_helpers import run_torchrun
from gradkit.integrations.lightning import GradkitCallback

ROOT = Path(__file__).resolve().parent.parent
MAX_NORM = 0.05  # small enough that most steps of the toy problem clip


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def fit(callback=None, *, devices: int = 1, gradient_clip_val=None, steps: int = 6) -> Regression:
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
    model = Regression()
    trainer = L.Trainer(
        max_steps=steps, accumulate_grad_batches=2, accelerator="cpu", devices=devices,
        strategy="ddp" if devices > 1 else "auto", callbacks=[callback] if callback else None,
        gradient_clip_val=gradient_clip_val, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8, shuffle=False))
    return model


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_tracking_changes_nothing_and_sees_the_pre_clip_norm(tmp_path):
    plain = weights(fit(gradient_clip_val=MAX_NORM))
    tracker = gk.Tracker(tmp_path / "run", every=1)
    tracked = weights(fit(GradkitCallback(tracker), gradient_clip_val=MAX_NORM))
    assert all(torch.equal(a, b) for a, b in zip(plain, tracked))  # bit-identical
    assert [r["step"] for r in tracker.history] == list(range(1, 7))
    # Lightning clips after the hook: the tracker saw norms above the clip threshold.
    assert max(r["global"]["norm_pre_clip"] for r in tracker.history) > MAX_NORM
    lines = [json.loads(line) for line in (tmp_path / "run" / "tracking.jsonl").read_text().splitlines()]
    assert lines[0]["type"] == "run" and sum(line["type"] == "step" for line in lines) == 6


def test_gradkit_clipping_equals_lightning_clipping():
    reference = weights(fit(gradient_clip_val=MAX_NORM))
    ours = weights(fit(GradkitCallback(clip=gk.ClipByGlobalNorm(MAX_NORM))))
    unclipped = weights(fit())
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(reference, unclipped))  # clipping mattered
    for a, b in zip(reference, ours):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_tracker_norm_equals_the_accumulated_gradient_norm(tmp_path):
    # The tracker's global norm is the norm of the mean over the two micro-batches, as Lightning applies it.
    class Probe(L.Callback):
        def __init__(self) -> None:
            self.norms: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.norms.append(torch.nn.utils.get_total_norm(grads).item())

    tracker, probe = gk.Tracker(None, every=1), Probe()
    torch.manual_seed(0)
    cb = GradkitCallback(tracker)
    x = torch.randn(128, 8)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
    trainer = L.Trainer(max_steps=4, accumulate_grad_batches=2, accelerator="cpu", callbacks=[probe, cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(Regression(), torch.utils.data.DataLoader(data, batch_size=8))
    ours = [r["global"]["norm_pre_clip"] for r in tracker.history]
    assert len(ours) == len(probe.norms) == 4
    for a, b in zip(ours, probe.norms):
        assert abs(a - b) <= 1e-5 * b


def test_both_clips_set_is_an_error():
    with pytest.raises(ValueError, match="gradient_clip_val"):
        fit(GradkitCallback(clip=gk.ClipByGlobalNorm(1.0)), gradient_clip_val=1.0)


@pytest.mark.parametrize("bad", [0.5, "zclip", [gk.ZClip(), 1.0]])
def test_bad_clip_is_a_clear_error(bad):
    with pytest.raises(TypeError, match="clip must be a gradkit clip stage"):
        GradkitCallback(clip=bad)


def test_bad_tracker_is_a_clear_error():
    with pytest.raises(TypeError, match="tracker must have wants"):
        GradkitCallback(tracker="runs/x")


def _run(*args: str, timeout: float = 240) -> str:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    # Lightning's DDP holds the gloo group past destroy_process_group(): see dist_helpers.GLOO_EXIT_ABORT.
    done = run_torchrun([sys.executable, *args], timeout=timeout, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_ddp_two_processes_tracking_and_clipping():
    out = _run(str(Path(__file__).resolve()), "--devices", "2")
    found = {(mode, rank): float(value) for mode, rank, value in re.findall(r"(\w+) rank (\d): (-?\d+\.\d+)", out)}
    assert len(found) == 8, out
    for mode in ("plain", "tracked", "plclip", "gkclip"):
        assert found[(mode, "0")] == found[(mode, "1")], (mode, out)  # replicas agree
    assert found[("plain", "0")] == found[("tracked", "0")]  # bit-identical checksum
    assert abs(found[("gkclip", "0")] - found[("plclip", "0")]) <= 1e-5 * abs(found[("plclip", "0")])
    assert "tracked steps 6" in out


def test_lightning_example_runs(tmp_path):
    out = _run(str(ROOT / "examples" / "lightning_trainer.py"), "--steps", "10", "--log-dir", str(tmp_path / "run"))
    assert re.search(r"rank 0: done, loss [\d.]+", out)
    assert (tmp_path / "run" / "tracking.jsonl").exists()


def _ddp_main(devices: int) -> None:
    import tempfile

    tracker = gk.Tracker(tempfile.mkdtemp(prefix="gradkit-pl-"), every=1)
    runs = {
        "plain": fit(devices=devices, gradient_clip_val=MAX_NORM),
        "tracked": fit(GradkitCallback(tracker), devices=devices, gradient_clip_val=MAX_NORM),
        "plclip": fit(devices=devices, gradient_clip_val=MAX_NORM),
        "gkclip": fit(GradkitCallback(clip=gk.ClipByGlobalNorm(MAX_NORM)), devices=devices),
    }
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for mode, model in runs.items():
        print(f"{mode} rank {rank}: {sum(p.double().sum().item() for p in model.parameters()):.12f}", flush=True)
    if rank == 0:
        print(f"tracked steps {len(tracker.history)}", flush=True)
    if torch.distributed.is_initialized():  # Lightning leaves its group up; taken down in order, gloo exits cleanly
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    _ddp_main(parser.parse_args().devices)
