"""gradkit inside a Lightning Trainer: a tracker and a clip stage, with accumulation (and DDP on CPU).
    python examples/lightning_trainer.py --steps 20 --devices 2 --log-dir runs/pl      # then: gradkit report runs/pl"""

import argparse

import lightning as L
import torch
from torch import nn

import gradkit as gk
from gradkit.integrations.lightning import GradkitCallback


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        self.log("train_loss", loss := nn.functional.mse_loss(self.net(batch[0]), batch[1]))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


parser = argparse.ArgumentParser()
for flag, default in (("--steps", 20), ("--devices", 1), ("--log-dir", "runs/pl")):
    parser.add_argument(flag, type=type(default), default=default)
args = parser.parse_args()
torch.manual_seed(0)
data = torch.utils.data.TensorDataset(x := torch.randn(512, 16), x.sum(1, keepdim=True).sin())
callback = GradkitCallback(gk.Tracker(args.log_dir, every=5), clip=gk.ClipByGlobalNorm(1.0))
trainer = L.Trainer(max_steps=args.steps, accumulate_grad_batches=2, accelerator="cpu", devices=args.devices,
                    strategy="ddp" if args.devices > 1 else "auto", callbacks=[callback], logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
trainer.fit(model := Regression(), torch.utils.data.DataLoader(data, batch_size=16))
checksum = sum(p.double().sum().item() for p in model.parameters())
print(f"rank {trainer.global_rank}: done, loss {trainer.callback_metrics['train_loss']:.4f}, checksum {checksum:.6f}")
