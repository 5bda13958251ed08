"""Captions to the UNet's conditioning: CLIP skip and captions longer than one 77-token window.

Both follow kohya's sd-scripts (library/train_util.py), the convention SD 1.x LoRAs are trained with:

- ``clip_skip`` N takes the text encoder's N-th hidden state from the end and applies its final layer norm
  (1 is the usual last hidden state; 2, "penultimate", is what A1111 calls CLIP skip 2). diffusers' pipeline
  argument counts from 0 (its clip_skip=1 is our 2), and reaches the norm through a ``text_model`` attribute
  transformers 5 no longer has, so sampling passes embeddings computed here instead.
- ``max_token_length`` 150 or 225 tokenizes a caption to that many tokens plus BOS/EOS, cuts them into 75-token
  windows, wraps each in the caption's BOS and last token (77 ids), encodes each window on its own and joins
  the outputs as BOS, every window's 75 inner positions, and the last window's final position: 2 + 75 x n.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .wrappers import bare_module

#: Tokens a window holds between its BOS and EOS.
INNER = 75


def token_ids(tokenizer, captions: list[str], max_token_length: int = INNER) -> torch.Tensor:
    """Token ids [B, 77 x windows]: one padded window for 75 tokens, else ``max_token_length // 75`` windows."""
    window = tokenizer.model_max_length
    if max_token_length <= window - 2:
        return tokenizer(captions, padding="max_length", max_length=window, truncation=True,
                         return_tensors="pt").input_ids
    ids = tokenizer(captions, padding="max_length", max_length=max_token_length + 2, truncation=True,
                    return_tensors="pt").input_ids
    inner = window - 2
    windows = []
    for start in range(1, max_token_length + 1, inner):
        chunk = torch.cat([ids[:, :1], ids[:, start : start + inner], ids[:, -1:]], dim=1)
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            # kohya's rule where padding is not EOS: a window that runs on ends in EOS, an empty one starts with it.
            runs_on = (chunk[:, -2] != tokenizer.eos_token_id) & (chunk[:, -2] != tokenizer.pad_token_id)
            chunk[runs_on, -1] = tokenizer.eos_token_id
            chunk[chunk[:, 1] == tokenizer.pad_token_id, 1] = tokenizer.eos_token_id
        windows.append(chunk)
    return torch.cat(windows, dim=1)


def check_clip_skip(text_encoder: torch.nn.Module, clip_skip: int) -> None:
    """Refuse a clip_skip beyond the text encoder's layers, naming the key."""
    layers = bare_module(text_encoder).config.num_hidden_layers
    if clip_skip > layers:
        raise ConfigError(f"model.clip_skip={clip_skip}, but the text encoder has {layers} layers; "
                         f"use 1 (last layer) to {layers}")


def encode_tokens(text_encoder: torch.nn.Module, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Hidden states [B, tokens, width] for ``token_ids`` output: windows encoded apart and joined as kohya does."""
    window = bare_module(text_encoder).config.max_position_embeddings
    batch, windows = input_ids.shape[0], input_ids.shape[1] // window
    flat = input_ids.reshape(batch * windows, window)
    if clip_skip == 1:
        hidden = text_encoder(flat, return_dict=False)[0]
    else:
        states = text_encoder(flat, output_hidden_states=True, return_dict=True).hidden_states
        hidden = bare_module(text_encoder).final_layer_norm(states[-clip_skip])
    if windows == 1:
        return hidden
    hidden = hidden.reshape(batch, windows * window, hidden.shape[-1])
    inner = [hidden[:, start : start + window - 2] for start in range(1, windows * window, window)]
    return torch.cat([hidden[:, :1], *inner, hidden[:, -1:]], dim=1)


def kohya_text_metadata(clip_skip: int, max_token_length: int) -> dict[str, str]:
    """kohya's ``ss_clip_skip`` / ``ss_max_token_length`` for settings other than the defaults (UIs show them)."""
    metadata = {}
    if clip_skip != 1:
        metadata["ss_clip_skip"] = str(clip_skip)
    if max_token_length != INNER:
        metadata["ss_max_token_length"] = str(max_token_length)
    return metadata
