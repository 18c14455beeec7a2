"""Character-level text data: the built-in corpus or a user's file, batches by (seed, rank, step).

The built-in corpus is the Python documentation that ships inside every
CPython installation (`pydoc_data.topics`, about 465 KB): real English text
with code, and nothing to download. Batches are drawn from a generator seeded
by (seed, rank, step, micro-step), so a resumed run reads exactly what an
uninterrupted one would have.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from gradkit.train.config import ConfigError

__all__ = ["Corpus", "load_text"]


def load_text(path: str) -> str:
    """The text to train on: a UTF-8 file, or the built-in corpus for an empty path."""
    if not path:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics))
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"text file {path!r} does not exist; pass a UTF-8 text file, or leave text out for the built-in corpus"
        ) from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"text file {path!r} is not UTF-8 ({error.reason} at byte {error.start}); convert it, e.g. iconv -t UTF-8"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read text file {path!r}: {error.strerror}") from None
    if not text.strip():
        raise ConfigError(f"text file {path!r} is empty; pass a file with some text to learn from")
    return text


class Corpus:
    """Text as character ids, split 90/10 into training and validation."""

    def __init__(self, text: str, context: int) -> None:
        self.chars = sorted(set(text))
        index = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        cut = int(len(ids) * 0.9)
        self.train, self.valid = ids[:cut], ids[cut:]
        self.context = context
        shortest = min(len(self.train), len(self.valid))
        if shortest <= context + 1:
            raise ConfigError(
                f"the text is too short for context={context}: its validation part has {len(self.valid)} characters; "
                f"use a longer text (at least {10 * (context + 2)} characters) or a smaller context"
            )

    @property
    def vocab(self) -> int:
        return len(self.chars)

    def batch(self, split: str, size: int, seed: int) -> tuple[Tensor, Tensor]:
        """`size` windows of `context` characters and their next characters, drawn by `seed`."""
        ids = self.train if split == "train" else self.valid
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(len(ids) - self.context - 1, (size,), generator=generator)
        x = torch.stack([ids[s : s + self.context] for s in starts.tolist()])
        y = torch.stack([ids[s + 1 : s + self.context + 1] for s in starts.tolist()])
        return x, y
