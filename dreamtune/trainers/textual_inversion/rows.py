"""New words' rows in the text encoder's embedding table: added, the only rows that learn, saved and restored alone.

Textual Inversion and pivotal tuning both learn new words this way; every old row stays bitwise as loaded.
"""

from __future__ import annotations

import torch

from ...errors import ConfigError

#: Checkpoint key: the new rows ``[num_vectors, hidden]``.
ROWS_KEY = "placeholder_rows"


def refuse_known_words(tokenizer, words: list[str], key: str) -> None:
    """Each word must be new to the tokenizer (not a token it knows, nor read as one), or ``key`` is named."""
    vocab = tokenizer.get_vocab()
    taken = [w for w in words if w in vocab]
    for word in words:
        ids = tokenizer.encode(word, add_special_tokens=False)
        if word not in taken and len(ids) == 1:
            taken.append(f"{word} (read as {tokenizer.convert_ids_to_tokens(ids)[0]!r})")
    if taken:
        raise ConfigError(f"{key}: {', '.join(taken)} already in the tokenizer's vocabulary; "
                          "choose a new word such as '<my-concept>' or 'S*'")


class NewRows:
    """The rows of ``tokens`` in a text encoder's embedding table, trained alone.

    Gradients of every other row are zeroed before clipping and Adam see them, and after each step the
    old rows are put back bitwise (AdamW's weight decay moves rows whose gradient is zero).
    """

    def __init__(self, tokens: list[str]):
        self.tokens = list(tokens)
        self.ids: list[int] = []
        self._original: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    def add(self, tokenizer, text_encoder: torch.nn.Module, start: torch.Tensor) -> list[int]:
        """Add the words to the tokenizer and rows ``start`` ``[n, hidden]`` to the table; return their ids."""
        from transformers import AddedToken

        # normalized=False: matched case-sensitively before CLIP lowercases, so 'S*' stays 'S*' and
        # diffusers' prompt expansion (which looks tokens up by their spelling) finds every vector.
        tokenizer.add_tokens([AddedToken(t, normalized=False) for t in self.tokens])
        self.ids = tokenizer.convert_tokens_to_ids(self.tokens)
        if len(tokenizer) > text_encoder.get_input_embeddings().num_embeddings:
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[self.ids] = start.to(weight.device, weight.dtype)
        return self.ids

    def train(self, text_encoder: torch.nn.Module) -> torch.nn.Parameter:
        """Make the table trainable with only the new rows learning; returns the table."""
        weight = text_encoder.get_input_embeddings().weight
        weight.requires_grad_(True)
        self._original = weight.detach().clone()
        self._mask = torch.zeros(weight.shape[0], dtype=torch.bool)
        self._mask[self.ids] = True
        weight.register_hook(self._mask_gradient)
        return weight

    def _mask_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        keep = self._mask_on(grad.device).unsqueeze(1)
        return torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))

    def restore_old_rows(self, weight: torch.Tensor) -> None:
        """Every row but the new ones back to its value at ``train``, bitwise."""
        assert self._original is not None, "train() must run first"
        if self._original.device != weight.device or self._original.dtype != weight.dtype:
            self._original = self._original.to(weight.device, weight.dtype)
        with torch.no_grad():
            weight.copy_(torch.where(self._mask_on(weight.device).unsqueeze(1), weight, self._original))

    def old_rows(self) -> torch.Tensor:
        """The table's other rows as loaded (the vocabulary), for statistics such as their norm."""
        assert self._original is not None and self._mask is not None, "train() must run first"
        return self._original[~self._mask.to(self._original.device)]

    def _mask_on(self, device: torch.device) -> torch.Tensor:
        assert self._mask is not None, "train() must run first"
        if self._mask.device != device:
            self._mask = self._mask.to(device)
        return self._mask

    def vectors(self, text_encoder: torch.nn.Module) -> torch.Tensor:
        """The new rows, ``[n, hidden]``, fp32 on the CPU."""
        return text_encoder.get_input_embeddings().weight.detach()[self.ids].float().cpu()

    def load(self, text_encoder: torch.nn.Module, rows: torch.Tensor, fix: str) -> None:
        """Write ``rows`` into the new ids; a shape mismatch raises ConfigError ending with ``fix``."""
        weight = text_encoder.get_input_embeddings().weight
        if tuple(rows.shape) != (len(self.ids), weight.shape[1]):
            raise ConfigError(f"checkpoint rows have shape {tuple(rows.shape)} but this run trains {len(self.ids)} x "
                              f"{weight.shape[1]}; {fix}")
        with torch.no_grad():
            weight[self.ids] = rows.to(weight.device, weight.dtype)
