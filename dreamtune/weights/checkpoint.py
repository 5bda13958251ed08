"""SD 1.x checkpoints as files: open either layout as canonical single-file tensors, write either layout.

Opening renames a diffusers folder's ``unet/``, ``vae/`` and ``text_encoder/`` weights through the
key maps of its own configs, and fixes a single file's old text-encoder naming and 2-D VAE
attention, so every tool sees canonical single-file keys: text-encoder keys under
``cond_stage_model.transformer.text_model.``, VAE attention as 1x1 convs. Writing a diffusers
folder goes through a pipeline built in a temp folder beside the target and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..errors import WeightsError
from .diffusers_folder import (component_file, config_dir_for, read_config, require_diffusers_folder,
                               save_pipeline_folder)
from .ldm_keys import TEXT_MODEL_PREFIX, TEXT_PREFIX, TEXT_ROOTS, UNET_PREFIX, unet_key_map, vae_key_map
from .safetensors_io import PathLike, is_pickle_path, save_safetensors
from .single_file import HARMLESS_KEYS, HARMLESS_PREFIXES, checkpoint_metadata, pipeline_from_state, refuse_non_sd1
from .sources import Reader, TensorSource, open_reader, read_state

_VAE_ATTN_1X1 = re.compile(r"^first_stage_model\.(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _canonical_single_key(key: str) -> str | None:
    """Canonical name of a single-file key; None for known harmless extras."""
    if key in HARMLESS_KEYS or key.startswith(HARMLESS_PREFIXES):
        return None
    if key.startswith(TEXT_PREFIX) and not key.startswith(TEXT_MODEL_PREFIX):
        rest = key[len(TEXT_PREFIX):]
        return TEXT_MODEL_PREFIX + rest if rest.startswith(TEXT_ROOTS) else key
    return key


def open_single_file(path: PathLike, allow_pickle: bool = False) -> TensorSource:
    """A single-file SD 1.x checkpoint, keys canonical (old text-encoder naming and 2-D VAE attention fixed)."""
    p = Path(path)
    handle, keys = open_reader(p, allow_pickle)
    refuse_non_sd1(keys)
    entries: dict[str, tuple[Reader, str, bool]] = {}
    for key in keys:
        name = _canonical_single_key(key)
        if name is None:
            continue
        entries[name] = (handle, key, bool(_VAE_ATTN_1X1.match(name)) and len(handle.shape(key)) == 2)
    if not any(k.startswith(UNET_PREFIX) for k in entries):
        raise WeightsError(f"{p} is not an SD 1.x checkpoint: it has no '{UNET_PREFIX}*' keys")
    return TensorSource(p.name, p, entries)


def open_diffusers_folder(folder: PathLike, allow_pickle: bool = False) -> TensorSource:
    """A diffusers SD 1.x folder, its UNet/VAE/text-encoder keys renamed to canonical single-file names."""
    root = Path(folder)
    entries: dict[str, tuple[Reader, str, bool]] = {}
    unet_map = unet_key_map(read_config(root, "unet"))
    vae_map = vae_key_map(read_config(root, "vae"))
    for component, key_map in (("unet", unet_map), ("vae", vae_map)):
        handle, keys = open_reader(component_file(root, component, allow_pickle), allow_pickle)
        for key in keys:
            if key not in key_map.to_single:
                raise WeightsError(f"{root}/{component}: key {key!r} is not in the key map of its config")
            entries[key_map.to_single[key]] = (handle, key, key in key_map.conv1x1)
    handle, keys = open_reader(component_file(root, "text_encoder", allow_pickle), allow_pickle)
    for key in keys:
        rest = key.removeprefix("text_model.")
        if rest.startswith(TEXT_ROOTS):
            entries[TEXT_MODEL_PREFIX + rest] = (handle, key, False)
    return TensorSource(root.name, root, entries)


def open_checkpoint(path: PathLike, allow_pickle: bool = False) -> TensorSource:
    """Open a single-file checkpoint or a diffusers folder, keys canonical."""
    p = Path(path)
    if p.is_dir():
        return open_diffusers_folder(require_diffusers_folder(p), allow_pickle)
    if is_pickle_path(p) and not allow_pickle:
        raise WeightsError(f"{p} is a pickled checkpoint ({p.suffix}); pass --allow-pickle if you trust it")
    return open_single_file(p, allow_pickle)


# ----------------------------------------------------------------------------- writers


def atomic_folder(target: PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_folder)`` on a temp folder beside ``target``, then rename it into place."""
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_diffusers_folder(state: Mapping[str, torch.Tensor], target: PathLike, config_dir: PathLike | None,
                          metadata: Mapping[str, str], dtype: torch.dtype | None = None) -> Path:
    """Write a canonical state dict as a diffusers folder (atomic); metadata goes to ``dreamtune_provenance.json``."""
    pipe = pipeline_from_state(state, config_dir, dtype)

    def write(tmp: Path) -> None:
        save_pipeline_folder(pipe, tmp)
        (tmp / "dreamtune_provenance.json").write_text(json.dumps(dict(metadata), indent=2) + "\n")

    return atomic_folder(target, write)


def save_checkpoint(state: Mapping[str, torch.Tensor], target: PathLike, fmt: str,
                    metadata: Mapping[str, str], config_dir: PathLike | None = None) -> Path:
    """Write a canonical state dict as ``single-file`` (``.safetensors``) or ``diffusers`` (folder)."""
    if fmt == "diffusers":
        return save_diffusers_folder(state, target, config_dir, metadata)
    if fmt != "single-file":
        raise WeightsError(f"unknown output format {fmt!r}; use single-file or diffusers")
    if Path(target).suffix != ".safetensors":
        raise WeightsError(f"single-file output {target} must end in .safetensors")
    return save_safetensors(state, target, checkpoint_metadata(Path(target).stem, metadata))


def convert_checkpoint(src: PathLike, dst: PathLike, fmt: str, dtype: torch.dtype | None,
                       metadata: Mapping[str, str], config_dir: PathLike | None = None,
                       allow_pickle: bool = False) -> Path:
    """Single-file <-> diffusers folder (or a dtype change), tensor for tensor."""
    with open_checkpoint(src, allow_pickle) as source:
        state = read_state(source, dtype)
    return save_checkpoint(state, dst, fmt, metadata, config_dir_for([src], config_dir))
