"""Tell what a weight file (or diffusers folder) is, from its header: checkpoint, LoRA or TI embedding.

Only the header is read (names, shapes, dtypes, metadata), plus the few 0-dim kohya ``alpha``
tensors; a multi-gigabyte checkpoint is described without loading it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import WeightsError
from .embeddings import CLIP_L_KEY, is_bundle_key
from .diffusers_folder import (COMPONENT_FILES, HUB_TEXT_ENCODER_PREFIX, find_component_file,
                               require_diffusers_folder)
from .ldm_keys import component_of
from .lora_files import lora_layout
from .lora_keys import KOHYA_TEXT_ENCODER_INPUT_PREFIXES, KOHYA_UNET_PREFIX
from .lycoris_files import describe_adapter
from .readers import readers
from .safetensors_io import PathLike, is_pickle_path, load_pickle, read_safetensors_header
from .single_file import detect_layout

Header = dict[str, tuple[tuple[int, ...], str]]


def read_header(path: Path, allow_pickle: bool = False) -> tuple[Header, dict[str, str], Any]:
    """``({key: (shape, dtype)}, metadata, reader)``; reader gives tensors (for the few read)."""
    if is_pickle_path(path):
        obj = load_pickle(path, allow_pickle=allow_pickle)
        flat = _flatten_pickle(obj)
        return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in flat.items()}, {}, flat.get
    read_safetensors_header(path)  # a damaged file is refused by name before safetensors opens it
    handle = safe_open(str(path), framework="pt", device="cpu")
    header = {}
    for key in handle.keys():
        piece = handle.get_slice(key)
        header[key] = (tuple(piece.get_shape()), piece.get_dtype())
    return header, dict(handle.metadata() or {}), handle.get_tensor


def _flatten_pickle(obj: Any) -> dict[str, Any]:
    """A pickled state dict (``state_dict`` unwrapped, A1111 ``string_to_param`` as ``emb_params``)."""
    if isinstance(obj, dict) and "string_to_param" in obj:
        return {"emb_params": next(iter(obj["string_to_param"].values()))}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"the pickle holds a {type(obj).__name__}, not a dict of tensors")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def classify(header: Header) -> tuple[str, str]:
    """``(kind, layout)``: checkpoint/lora/textual-inversion/unet-weights/unknown and its layout."""
    keys = list(header)
    layout = lora_layout(keys)
    if layout != "unknown":
        return "lora", layout
    if keys == [CLIP_L_KEY]:
        return "textual-inversion", "clip_l"
    if len(keys) == 1 and len(header[keys[0]][0]) in (1, 2):
        return "textual-inversion", "a1111" if keys[0] == "emb_params" else "diffusers"
    if {"clip_l", "clip_g"} & set(keys):
        return "textual-inversion", "sdxl"
    found = detect_layout(keys)
    if found.startswith("single_file"):
        return "checkpoint", found.replace("_", "-")
    if found != "unknown":
        return "component-weights", found
    return "unknown", "unknown"


def _dtype_counts(header: Header) -> dict[str, int]:
    """How many tensors of each dtype."""
    return dict(Counter(dtype for _, dtype in header.values()))


def _lora_details(header: Header, layout: str, metadata: dict[str, str], read: Any) -> dict[str, Any]:
    """Ranks, alphas, module counts per model and targeted layer names of a LoRA."""
    modules: dict[str, dict[str, Any]] = {}
    for key, (shape, _) in header.items():
        if layout == "kohya":
            name, _, suffix = key.partition(".")
            part = "unet" if name.startswith(KOHYA_UNET_PREFIX) else "text_encoder"
            entry = modules.setdefault(name, {"part": part})
            if suffix == "lora_down.weight":
                entry["rank"], entry["conv"] = shape[0], len(shape) == 4
            elif suffix == "alpha":
                entry["alpha"] = float(read(key).item())
        elif ".lora_A." in key:
            name = key.split(".lora_A.")[0]
            part = "text_encoder" if name.startswith(("text_encoder.", *KOHYA_TEXT_ENCODER_INPUT_PREFIXES)) else "unet"
            modules[name] = {"part": part, "rank": shape[0], "conv": len(shape) == 4}
    for entry in modules.values():
        entry.setdefault("alpha", float(entry.get("rank", 0)))
    targets = Counter(_leaf(name, layout) for name in modules)
    alphas_known = layout == "kohya" or "lora_adapter_metadata" in metadata
    return {
        "ranks": sorted({m["rank"] for m in modules.values() if "rank" in m}),
        "alphas": sorted({m["alpha"] for m in modules.values()}) if alphas_known else "not stored (alpha = rank)",
        "modules": {"unet": sum(m["part"] == "unet" for m in modules.values()),
                    "text_encoder": sum(m["part"] == "text_encoder" for m in modules.values())},
        "conv_modules": sum(bool(m.get("conv")) for m in modules.values()),
        "targets": dict(sorted(targets.items())),
    }


#: Layer names a LoRA targets, flattened (kohya spelling) -> display spelling; longest first.
_LEAVES = {
    leaf.replace(".", "_"): leaf
    for leaf in ("ff.net.0.proj", "time_emb_proj", "conv_shortcut", "to_out.0", "proj_out", "proj_in",
                 "out_proj", "ff.net.2", "conv_out", "conv_in", "q_proj", "k_proj", "v_proj", "conv1", "conv2",
                 "to_q", "to_k", "to_v", "fc1", "fc2", "conv")
}


def _leaf(name: str, layout: str) -> str:
    """The layer type a LoRA module targets (``to_q``, ``proj_in``, ``fc1``, ...)."""
    flat = "_" + name.replace(".", "_")
    for leaf, shown in _LEAVES.items():
        if flat.endswith("_" + leaf):
            return shown
    return flat.rsplit("_", 1)[-1]


def _checkpoint_details(header: Header) -> dict[str, Any]:
    """Tensor and parameter counts per component of a single-file checkpoint."""
    parts: dict[str, dict[str, int]] = {}
    for key, (shape, _) in header.items():
        entry = parts.setdefault(component_of(key), {"tensors": 0, "parameters": 0})
        entry["tensors"] += 1
        entry["parameters"] += _numel(shape)
    return {"components": parts}


def _numel(shape: tuple[int, ...]) -> int:
    """Elements of a shape (1 for a scalar)."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def describe_file(path: PathLike, allow_pickle: bool = False) -> dict[str, Any]:
    """Describe a ``.safetensors`` (or, when allowed, pickled) weight file."""
    p = Path(path)
    header, metadata, read = read_header(p, allow_pickle)
    kind, layout = classify(header)
    info: dict[str, Any] = {
        "path": str(p), "kind": kind, "layout": layout, "size_bytes": p.stat().st_size,
        "tensors": len(header), "parameters": sum(_numel(s) for s, _ in header.values()),
        "dtypes": _dtype_counts(header), "metadata": metadata,
    }
    if kind == "lora":
        adapter = {k: v for k, v in header.items() if not is_bundle_key(k)}
        info.update(describe_adapter(adapter, read) or _lora_details(adapter, layout, metadata, read))
        if bundled := {k.split(".")[1]: v[0][0] for k, v in header.items() if is_bundle_key(k)}:
            info["bundled_embeddings"] = bundled  # the word to type -> its vectors
    elif kind == "textual-inversion" and layout in ("a1111", "diffusers"):
        key, (shape, _) = next(iter(header.items()))
        info.update({"vectors": shape[0] if len(shape) == 2 else 1, "dim": shape[-1],
                     "token": None if layout == "a1111" else key})
    elif kind == "checkpoint":
        info.update(_checkpoint_details(header))
    info["loads_in"] = readers(info, header)
    return info


def describe_folder(path: PathLike, allow_pickle: bool = False) -> dict[str, Any]:
    """Describe a diffusers SD 1.x pipeline folder, component by component."""
    root = Path(path)
    components: dict[str, Any] = {}
    hub_text_encoder = False
    for component in COMPONENT_FILES:
        weights = find_component_file(root, component)
        if weights is None:
            continue
        header, _, _ = read_header(weights, allow_pickle)
        if component == "text_encoder":
            hub_text_encoder = all(k.startswith(HUB_TEXT_ENCODER_PREFIX) for k in header)
        components[component] = {"file": weights.name, "tensors": len(header), "dtypes": _dtype_counts(header),
                                  "parameters": sum(_numel(s) for s, _ in header.values())}
    model_index = root / "model_index.json"
    files = [f for f in root.rglob("*") if f.is_file()]
    info = {
        "path": str(root), "kind": "checkpoint", "layout": "diffusers", "hub_text_encoder": hub_text_encoder,
        "size_bytes": sum(f.stat().st_size for f in files),
        "tensors": sum(c["tensors"] for c in components.values()),
        "parameters": sum(c["parameters"] for c in components.values()),
        "components": components,
        "pipeline": json.loads(model_index.read_text()).get("_class_name") if model_index.is_file() else None,
    }
    info["loads_in"] = readers(info)
    return info


def describe(path: PathLike, allow_pickle: bool = False) -> dict[str, Any]:
    """Describe a weight file or a diffusers folder (see :func:`describe_file`)."""
    p = Path(path)
    if p.is_dir():
        return describe_folder(require_diffusers_folder(p), allow_pickle)
    if not p.is_file():
        raise FileNotFoundError(f"no such file or folder: {p}")
    return describe_file(p, allow_pickle)
