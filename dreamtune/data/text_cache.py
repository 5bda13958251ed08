"""Text-encoder outputs computed once per distinct caption (data.cache_text_embeddings), kept in memory."""

from __future__ import annotations

from typing import Callable, Iterable

import torch


class TextEmbeddingCache:
    """Caption -> the frozen text encoder's output for it, encoded up front in batches and kept on the CPU."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], captions: Iterable[str], batch_size: int = 32):
        self.embeddings: dict[str, torch.Tensor] = {}
        distinct = sorted(set(captions))
        for start in range(0, len(distinct), batch_size):
            chunk = distinct[start : start + batch_size]
            with torch.no_grad():
                hidden = encode(chunk)
            for caption, row in zip(chunk, hidden):
                self.embeddings[caption] = row.detach().to("cpu").clone()

    def __len__(self) -> int:
        return len(self.embeddings)

    def lookup(self, captions: list[str]) -> torch.Tensor:
        """The stacked embeddings of ``captions`` [B, tokens, hidden], in the encoder's dtype, on the CPU."""
        missing = [c for c in captions if c not in self.embeddings]
        if missing:
            raise KeyError(
                f"data.cache_text_embeddings: the caption {missing[0]!r} was not among the captions encoded before "
                "training; captions must be fixed for this cache (set data.cache_text_embeddings=false)"
            )
        return torch.stack([self.embeddings[c] for c in captions])
