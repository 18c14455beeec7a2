"""gradkit inside a Hugging Face Trainer: ZClip and a tracker on a tiny random GPT-2 (no download).

    python examples/hf_trainer.py --steps 20 --log-dir runs/hf     # or: torchrun --nproc_per_node 2 ...
    gradkit report runs/hf
"""

import argparse
import os

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import gradkit as gk
from gradkit.integrations.huggingface import GradkitCallback

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--log-dir", default="runs/hf")
parser.add_argument("--no-zclip", action="store_true")
args = parser.parse_args()
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
data = [{"input_ids": t, "labels": t} for t in torch.randint(0, 64, (256, 16))]  # 256 random sequences of 16
tracker = gk.Tracker(args.log_dir, every=5)
callback = GradkitCallback(tracker, clip=None if args.no_zclip else gk.ZClip())
train_args = TrainingArguments(
    "/tmp/gradkit-hf-example", max_steps=args.steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
    learning_rate=args.lr, max_grad_norm=0.0, logging_steps=5, report_to=[], save_strategy="no", use_cpu=True,
    ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None, disable_tqdm=True,
)  # fmt: skip
trainer = Trainer(model=model, args=train_args, train_dataset=data, callbacks=[callback])
trainer.train()
checksum, loss = sum(p.double().sum().item() for p in model.parameters()), trainer.state.log_history[-2]["loss"]
print(f"rank {trainer.args.process_index}: done, loss {loss:.4f}, checksum {checksum:.6f}")
if dist.is_initialized():  # the Trainer leaves its group up; taken down in order, gloo exits cleanly
    dist.barrier()
    dist.destroy_process_group()
