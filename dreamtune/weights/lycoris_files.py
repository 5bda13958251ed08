"""LoRA-family files in any spelling read into one :class:`AdapterFile`; LyCORIS files converted and described.

kohya/LyCORIS files (``lora_unet_*``/``lora_te_*``) are read as they are; diffusers and bare-PEFT
LoRA files go through :func:`~dreamtune.weights.lora_files.read_lora`. PEFT's own DoRA
(``lora_magnitude_vector``, normalised on the output axis) has no UI reading and is refused.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError
from .lora_files import convert_lora, lora_layout, read_lora
from .lora_keys import KOHYA_ALPHA, KOHYA_UNET_PREFIX
from .lycoris_formats import AdapterFile, AdapterModule, from_kohya_tensors, is_lycoris, kind_of, to_kohya_tensors
from .safetensors_io import PathLike, load_safetensors, save_safetensors


def from_lora_file(path: PathLike, allow_pickle: bool, unet_module_names, text_encoder_module_names) -> AdapterFile:
    """A diffusers/PEFT LoRA file as plain-LoRA adapter modules, per-module alpha kept."""
    lora = read_lora(path, allow_pickle, unet_module_names, text_encoder_module_names)
    result = AdapterFile(metadata=lora.metadata)
    for part in ("unet", "text_encoder"):
        for module, (down, up) in lora.modules(part).items():
            getattr(result, part)[module] = AdapterModule(
                "lora", {"lora_down.weight": down, "lora_up.weight": up}, lora.alphas[module])
    return result


def read_adapter(
    path: PathLike,
    allow_pickle: bool = False,
    unet_module_names: Sequence[str] | None = None,
    text_encoder_module_names: Sequence[str] | None = None,
) -> AdapterFile:
    """Load any LoRA-family file: kohya/LyCORIS (LoRA, LoCon, DoRA, LoHa, LoKr), diffusers or bare PEFT."""
    tensors, metadata = load_safetensors(path, allow_pickle=allow_pickle)
    if any(".lora_magnitude_vector" in k for k in tensors):
        raise WeightsError(
            f"{path}: a PEFT DoRA file (lora_magnitude_vector, normalised per output row) has no UI "
            "reading; export the kohya/LyCORIS DoRA file (dora_scale on the input axis) instead"
        )
    if lora_layout(list(tensors)) != "kohya":
        return from_lora_file(path, allow_pickle, unet_module_names, text_encoder_module_names)
    adapters = from_kohya_tensors(tensors, unet_module_names, text_encoder_module_names)
    adapters.metadata = metadata
    return adapters


def convert_adapter(src: PathLike, dst: PathLike, to: str, dtype: torch.dtype | None,
                    metadata: Mapping[str, str], allow_pickle: bool = False) -> Path:
    """Convert a LoRA-family file; LoHa/LoKr/DoRA files only re-save as kohya/LyCORIS (dtype, metadata)."""
    tensors, header = load_safetensors(src, allow_pickle=allow_pickle)
    if not (lora_layout(list(tensors)) == "kohya" and is_lycoris(tensors)):
        return convert_lora(src, dst, to, dtype, metadata, allow_pickle)
    adapters = from_kohya_tensors(tensors)
    if to != "kohya":
        raise WeightsError(
            f"{src} is a {'/'.join(adapters.kinds())} file; diffusers cannot load these for SD 1.x, so there is no "
            "diffusers spelling. Use --to kohya (dtype/metadata), or bake it with `dreamtune merge-lora`"
        )
    out = to_kohya_tensors(adapters)
    out = {k: v if dtype is None or k.endswith("." + KOHYA_ALPHA) else v.to(dtype) for k, v in out.items()}
    return save_safetensors(out, dst, {**header, **metadata})


#: kohya names of the UNet's convolutions (LoCon targets): resnets' conv1/conv2/conv_shortcut, samplers' conv.
_CONV_NAME = re.compile(r"_conv(1|2|_shortcut|_in|_out)?$")


def describe_adapter(header: Mapping[str, tuple[tuple[int, ...], str]], read: Any) -> dict[str, Any] | None:
    """Algorithms, ranks, alphas and module counts of a kohya/LyCORIS file; None for plain LoRA."""
    if not is_lycoris(header):
        return None
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, (shape, _) in header.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = shape
    algorithms: Counter = Counter()
    ranks, alphas, conv = set(), set(), 0
    modules = {"unet": 0, "text_encoder": 0}
    for name, shapes in groups.items():
        kind = kind_of(shapes, name)
        algorithms["dora" if "dora_scale" in shapes else kind] += 1
        modules["unet" if name.startswith(KOHYA_UNET_PREFIX) else "text_encoder"] += 1
        rank_key = {"lora": "lora_down.weight", "loha": "hada_w1_b"}.get(kind) or next(
            (k for k in ("lokr_w2_b", "lokr_w1_b") if k in shapes), None)
        if rank_key:
            ranks.add(shapes[rank_key][0])
        if KOHYA_ALPHA in shapes:
            alphas.add(float(read(f"{name}.{KOHYA_ALPHA}").item()))
        conv += bool(_CONV_NAME.search(name))
    return {"algorithms": dict(sorted(algorithms.items())), "ranks": sorted(ranks), "alphas": sorted(alphas),
            "modules": modules, "conv_modules": int(conv)}
