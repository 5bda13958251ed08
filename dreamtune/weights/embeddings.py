"""Textual Inversion embedding files: diffusers, A1111/kohya safetensors, and A1111's legacy ``.pt``.

* diffusers ``learned_embeds.safetensors``: ``{token: Tensor[n, hidden]}``; the key is the trigger.
* A1111/kohya ``<name>.safetensors``: ``{"emb_params": Tensor[n, hidden]}``; A1111 uses the file
  name as the trigger, diffusers needs ``load_textual_inversion(path, token=...)``.
* A1111 legacy ``.pt`` (pickle): ``{"string_to_token": {"*": 265}, "string_to_param": {"*": tensor},
  "name": ..., "step": ...}``; diffusers reads ``name`` as the token.
* diffusers' advanced DreamBooth-LoRA script (pivotal tuning, SD 1.5): ``{"clip_l": Tensor[n, hidden]}``,
  one vector per new word (``<s0>``, ``<s1>``, ...), loaded with ``load_textual_inversion(sd["clip_l"], token=[...])``.
* bundled in a kohya LoRA file (A1111 loads it with the LoRA): ``bundle_emb.<name>.string_to_param.*``,
  beside the LoRA keys; ``<name>`` is the word to type (A1111 splits the key at dots).

All three hold ``[n_vectors, hidden]`` (768 for SD 1.x); we write float32 unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError
from .safetensors_io import (
    PathLike,
    atomic_write,
    is_pickle_path,
    load_pickle,
    load_safetensors,
    modelspec_metadata,
    save_safetensors,
)

A1111_KEY = "emb_params"
#: The advanced script's key for SD 1.x's one text encoder (CLIP ViT-L).
CLIP_L_KEY = "clip_l"
BUNDLE_PREFIX = "bundle_emb."
#: The CLIP token id A1111 writes in ``string_to_token`` ('*'); A1111 itself ignores it.
A1111_STAR_TOKEN_ID = 265
TI_ARCHITECTURE = "stable-diffusion-v1/textual-inversion"
#: kohya marks TI embeddings with the Stability reference implementation.
TI_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def _as_vectors(vectors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return ``[n, hidden]`` on CPU in ``dtype`` (a 1-D vector becomes one row)."""
    if not isinstance(vectors, torch.Tensor):
        raise TypeError(f"embedding vectors must be a torch.Tensor, got {type(vectors).__name__}")
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise WeightsError(f"embedding vectors must have shape [n_vectors, hidden], got {tuple(vectors.shape)}")
    return vectors.detach().to("cpu", dtype=dtype).contiguous()


def save_diffusers_embedding(
    path: PathLike,
    token: str,
    vectors: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write diffusers' ``{token: Tensor[n, hidden]}`` (``learned_embeds.safetensors``)."""
    if not token:
        raise WeightsError("the diffusers embedding needs a non-empty token (the key is the trigger)")
    return save_safetensors({token: _as_vectors(vectors, dtype)}, path, metadata)


def save_a1111_embedding(
    path: PathLike,
    vectors: torch.Tensor,
    name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write A1111/kohya's ``{"emb_params": Tensor[n, hidden]}`` with model-spec metadata.

    A1111 triggers the embedding by the file name, so name the file after the word to type;
    ``name`` (default: the file stem) becomes ``modelspec.title``. ``metadata`` keys win.
    """
    title = name or Path(path).stem
    header: dict[str, Any] = modelspec_metadata(
        architecture=TI_ARCHITECTURE, implementation=TI_IMPLEMENTATION, title=title
    )
    header.update(metadata or {})
    return save_safetensors({A1111_KEY: _as_vectors(vectors, dtype)}, path, header)


def save_clip_l_embedding(
    path: PathLike, vectors: torch.Tensor, metadata: Mapping[str, Any] | None = None, *,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the advanced script's ``{"clip_l": Tensor[n, hidden]}`` (``<name>_emb.safetensors``)."""
    return save_safetensors({CLIP_L_KEY: _as_vectors(vectors, dtype)}, path, metadata)


def bundle_tensors(name: str, vectors: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``{"bundle_emb.<name>.string_to_param.*": vectors}``: the embedding keys kohya puts in a LoRA file."""
    if not name or "." in name:
        raise WeightsError(f"bundled embedding name {name!r}: A1111 splits bundle keys at dots; use a name without")
    return {f"{BUNDLE_PREFIX}{name}.string_to_param.*": _as_vectors(vectors, dtype)}


def is_bundle_key(key: str) -> bool:
    return key.startswith(BUNDLE_PREFIX)


def bundled_embeddings(tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype = torch.float32
                       ) -> dict[str, torch.Tensor]:
    """``{name: vectors}`` of the embeddings bundled in a LoRA file, read as A1111 reads them
    (``string_to_param.<any>`` or ``emb_params`` under ``bundle_emb.<name>.``)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not is_bundle_key(key):
            continue
        name, _, part = key[len(BUNDLE_PREFIX):].partition(".")
        if part.split(".")[0] in ("string_to_param", A1111_KEY):
            out[name] = _as_vectors(tensor, dtype)
    return out


def save_a1111_pt(
    path: PathLike,
    vectors: torch.Tensor,
    name: str,
    *,
    step: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write A1111's legacy pickled ``.pt`` embedding (readable with ``torch.load(weights_only=True)``)."""
    data = {
        "string_to_token": {"*": A1111_STAR_TOKEN_ID},
        "string_to_param": {"*": _as_vectors(vectors, dtype)},
        "name": name,
        "step": int(step),
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }
    return atomic_write(path, lambda tmp: torch.save(data, tmp))


def load_embedding(
    path: PathLike, allow_pickle: bool = False, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, str | None]:
    """Read any of the formats above but a bundle -> ``(vectors[n, hidden], token)``; token is None for
    ``emb_params`` and ``clip_l``."""
    if is_pickle_path(path):
        return _from_pickle(load_pickle(path, allow_pickle=allow_pickle), Path(path), dtype)
    tensors, _ = load_safetensors(path)
    return _from_tensor_dict(tensors, Path(path), dtype)


def _from_tensor_dict(
    tensors: Mapping[str, torch.Tensor], path: Path, dtype: torch.dtype
) -> tuple[torch.Tensor, str | None]:
    """``{"emb_params": t}`` -> (t, None); ``{token: t}`` -> (t, token); anything else raises."""
    if A1111_KEY in tensors and len(tensors) == 1:
        return _as_vectors(tensors[A1111_KEY], dtype), None
    if set(tensors) == {CLIP_L_KEY}:  # the advanced script's SD 1.5 file: the words are not stored
        return _as_vectors(tensors[CLIP_L_KEY], dtype), None
    if {"clip_l", "clip_g"} & set(tensors):
        raise WeightsError(f"{path} is an SDXL embedding (clip_l/clip_g); dreamtune handles SD 1.x only")
    if len(tensors) != 1:
        raise WeightsError(
            f"{path} is not a textual-inversion embedding: expected one tensor "
            f"('emb_params' or the token), found keys {sorted(tensors)[:8]}"
        )
    token, vectors = next(iter(tensors.items()))
    return _as_vectors(vectors, dtype), token


def _from_pickle(obj: Any, path: Path, dtype: torch.dtype) -> tuple[torch.Tensor, str | None]:
    """A1111 ``string_to_param`` dicts and diffusers' old ``.bin`` ``{token: tensor}``."""
    if isinstance(obj, torch.Tensor):
        return _as_vectors(obj, dtype), None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not an embedding dict")
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise WeightsError(f"{path}: string_to_param must be a dict holding exactly one tensor")
        name = obj.get("name")
        return _as_vectors(next(iter(params.values())), dtype), name if isinstance(name, str) else None
    return _from_tensor_dict(obj, path, dtype)


def convert_embedding(src: PathLike, dst: PathLike, to: str, dtype: torch.dtype | None,
                      metadata: Mapping[str, str], token: str | None = None, allow_pickle: bool = False) -> Path:
    """diffusers ``{token: vectors}`` <-> A1111 ``{emb_params: vectors}`` (``to``: ``diffusers``/``a1111``)."""
    vectors, found = load_embedding(src, allow_pickle=allow_pickle, dtype=dtype)  # type: ignore[arg-type]
    if to == "a1111":
        return save_a1111_embedding(dst, vectors, name=found or Path(dst).stem, metadata=metadata,
                                    dtype=vectors.dtype)
    if to != "diffusers":
        raise WeightsError(f"an embedding converts to a1111 or diffusers, not {to!r}")
    name = token or found or Path(src).stem
    return save_diffusers_embedding(dst, name, vectors, dtype=vectors.dtype, metadata=metadata)

