"""Exact gradient accumulation for variable-length batches: the large-batch gradient for any split.

    python examples/accumulation.py --steps 100
"""

import argparse

import torch
import torch.nn.functional as F

import gradkit as gk

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=100)
args = parser.parse_args()

torch.manual_seed(0)
vocab, width = 50, 32
model = torch.nn.Sequential(torch.nn.Embedding(vocab, width), torch.nn.Linear(width, vocab))
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
pipe = gk.GradientPipeline(model, accumulation_steps=4)

for _ in range(args.steps * 4):
    length = int(torch.randint(2, 64, ()))  # sequences of very different lengths
    tokens = torch.randint(vocab, (length + 1,)) // 2 * 2  # a learnable pattern: even tokens only
    logits = model(tokens[:-1])
    loss = F.cross_entropy(logits, tokens[1:], reduction="sum")  # sum, and say how many tokens
    pipe.backward(loss, num_items=length)
    if pipe.step(optimizer) and pipe.steps % 25 == 0:
        print(f"step {pipe.steps}: loss/token {loss.item() / length:.3f}, tokens in window {int(pipe.last.items)}")
pipe.flush(optimizer)  # a last, incomplete window would be normalized by what it holds
