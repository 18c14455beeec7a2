"""Small character-level language models for the built-in training engine."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["build_model", "TinyTransformer", "TinyGRU"]


class TinyTransformer(nn.Module):
    """A decoder-only transformer: embeddings, `layers` causal pre-norm blocks, a head."""

    def __init__(self, vocab: int, width: int, layers: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(
            width, nhead=4, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        length = ids.shape[1]
        h = self.embed(ids) + self.position(torch.arange(length, device=ids.device))
        h = self.blocks(h, mask=self.mask[:length, :length], is_causal=True)
        return self.head(self.norm(h))


class TinyGRU(nn.Module):
    """Embeddings, a `layers`-deep GRU, a head."""

    def __init__(self, vocab: int, width: int, layers: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = nn.GRU(width, width, num_layers=layers, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(ids))[0])


def build_model(kind: str, vocab: int, width: int, layers: int, context: int) -> nn.Module:
    """The built-in model named `kind` ("transformer" or "gru")."""
    return {"transformer": TinyTransformer, "gru": TinyGRU}[kind](vocab, width, layers, context)
