"""Bake LoRAs (kohya or diffusers/PEFT files) into an SD 1.x checkpoint, linear and conv layers.

For a module with ``down`` (lora_A, ``[r, in]`` or conv ``[r, in, kh, kw]``), ``up`` (lora_B,
``[out, r]`` or conv ``[out, r, 1, 1]``), file scale ``alpha / r`` and user scale ``s``:
``W += s * alpha / r * up @ down`` (for convs, the composition of the two convolutions,
``einsum('or,rihw->oihw')``). The base is read one tensor at a time; only LoRA targets are recomputed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .convert import TensorSource, WeightsError, component_of
from .ldm_keys import TEXT_MODEL_PREFIX, KeyMap
from .lora_formats import (
    DIFFUSERS_ADAPTER_METADATA_KEY,
    TEXT_ENCODER_INPUT_PREFIXES,
    UNET_PREFIX,
    canonical_text_encoder_path,
    kohya_to_peft,
    lora_config_values,
    split_peft_key,
)
from .safetensors_io import PathLike, load_safetensors


class MergeError(WeightsError):
    """A LoRA that does not fit the checkpoint it is merged into."""


@dataclass
class LoraFile:
    """A LoRA in PEFT naming (``<module>.lora_A.weight``) per model, with per-module rank and alpha."""

    layout: str  # "kohya" | "diffusers" | "peft"
    unet: dict[str, torch.Tensor] = field(default_factory=dict)
    text_encoder: dict[str, torch.Tensor] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def modules(self, part: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (lora_A, lora_B)}`` of ``part`` (``unet`` or ``text_encoder``)."""
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in (self.unet if part == "unet" else self.text_encoder).items():
            module, kind = split_peft_key(key)
            pairs.setdefault(module, {})[kind] = tensor
        return {m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items()}

    def scale(self, module: str) -> float:
        """``alpha / rank`` of one module."""
        return self.alphas[module] / self.ranks[module]


def lora_layout(keys: Sequence[str]) -> str:
    """``kohya``, ``diffusers`` (``unet.``/``text_encoder.`` prefixed PEFT keys), ``peft`` or ``unknown``."""
    if keys and all(k.startswith((UNET_PREFIX, *TEXT_ENCODER_INPUT_PREFIXES, "lora_te2_")) for k in keys):
        return "kohya"
    lora_keys = [k for k in keys if ".lora_A." in k or ".lora_B." in k]
    if not lora_keys:
        return "unknown"
    if all(k.startswith(("unet.", "text_encoder.")) for k in keys):
        return "diffusers"
    return "peft"


def _adapter_configs(metadata: Mapping[str, str]) -> dict[str, dict]:
    """diffusers' packed ``lora_adapter_metadata`` header -> ``{part: LoraConfig kwargs}``."""
    raw = metadata.get(DIFFUSERS_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    configs: dict[str, dict] = {}
    for key, value in json.loads(raw).items():
        part, _, name = key.partition(".")
        configs.setdefault(part, {})[name] = value
    return configs


def _split_diffusers(tensors: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """``unet.*`` / ``text_encoder.[text_model.]*`` keys -> PEFT dicts per model (text keys canonical)."""
    unet, text = {}, {}
    for key, tensor in tensors.items():
        if key.startswith("unet."):
            unet[key[len("unet."):]] = tensor
        elif key.startswith("text_encoder."):
            text[canonical_text_encoder_path(key[len("text_encoder."):])] = tensor
    return unet, text


def _ranks_alphas(state: Mapping[str, torch.Tensor], config: Mapping | None) -> tuple[dict, dict]:
    """Per-module rank and alpha from a ``LoraConfig`` dict, or alpha = rank when there is none."""
    if config and "lora_alpha" in config:
        return lora_config_values(state, dict(config))
    pairs = LoraFile("peft", unet=dict(state)).modules("unet")
    ranks = {m: int(a.shape[0]) for m, (a, _) in pairs.items()}
    return ranks, {m: float(r) for m, r in ranks.items()}


def read_lora(
    path: PathLike,
    allow_pickle: bool = False,
    unet_module_names: Sequence[str] | None = None,
    text_encoder_module_names: Sequence[str] | None = None,
) -> LoraFile:
    """Load a kohya, diffusers or bare-PEFT (UNet) LoRA file into :class:`LoraFile`."""
    tensors, metadata = load_safetensors(path, allow_pickle=allow_pickle)
    layout = lora_layout(list(tensors))
    if layout == "kohya":
        k = kohya_to_peft(tensors, unet_module_names=unet_module_names,
                          text_encoder_module_names=text_encoder_module_names)
        return LoraFile("kohya", k.unet, k.text_encoder, k.ranks, k.alphas, metadata)
    if layout == "unknown":
        raise MergeError(f"{path} is not a LoRA: no lora_down/lora_up or lora_A/lora_B keys")
    unet, text = _split_diffusers(tensors) if layout == "diffusers" else (dict(tensors), {})
    configs = _adapter_configs(metadata)
    lora = LoraFile(layout, unet, text, metadata=metadata)
    for part, state in (("unet", unet), ("text_encoder", text)):
        ranks, alphas = _ranks_alphas(state, configs.get(part))
        lora.ranks.update(ranks)
        lora.alphas.update(alphas)
    return lora


def lora_delta(down: torch.Tensor, up: torch.Tensor, target_shape: tuple[int, ...], key: str) -> torch.Tensor:
    """``up @ down`` (linear) or the conv composition, in fp32, shaped like the target weight."""
    d, u = down.float(), up.float()
    if u.ndim == 4:
        if tuple(u.shape[2:]) != (1, 1):
            raise MergeError(f"{key}: LoRA up weight {tuple(u.shape)} is not a 1x1 conv (kohya conv LoRA)")
        u = u.flatten(1)
    if d.ndim == 4:
        delta = torch.einsum("or,rihw->oihw", u, d)
    elif d.ndim == 2 and u.ndim == 2:
        delta = u @ d
    else:
        raise MergeError(f"{key}: unsupported LoRA shapes down {tuple(down.shape)}, up {tuple(up.shape)}")
    if tuple(delta.shape) != tuple(target_shape):
        if delta.numel() != torch.Size(target_shape).numel() or delta.shape[:2] != torch.Size(target_shape[:2]):
            raise MergeError(
                f"LoRA for key {key!r} makes a {tuple(delta.shape)} update but the checkpoint weight is "
                f"{tuple(target_shape)}: is the LoRA for another model?"
            )
        delta = delta.reshape(target_shape)
    return delta


def _target_key(part: str, module: str, unet_map: KeyMap) -> str:
    """Canonical single-file weight key of a LoRA module."""
    if part == "text_encoder":
        return TEXT_MODEL_PREFIX + canonical_text_encoder_path(module) + ".weight"
    diffusers_key = module + ".weight"
    if diffusers_key not in unet_map.to_single:
        raise MergeError(f"LoRA UNet module {module!r} is not a weight of this checkpoint's UNet")
    return unet_map.to_single[diffusers_key]


Update = tuple[torch.Tensor, torch.Tensor, float]


def collect_updates(loras: Sequence[tuple[LoraFile, float]], unet_map: KeyMap) -> dict[str, list[Update]]:
    """``{canonical key: [(down, up, user_scale * alpha / rank), ...]}`` over all LoRAs."""
    updates: dict[str, list[Update]] = {}
    for lora, user_scale in loras:
        for part in ("unet", "text_encoder"):
            for module, (down, up) in lora.modules(part).items():
                key = _target_key(part, module, unet_map)
                updates.setdefault(key, []).append((down, up, user_scale * lora.scale(module)))
    if not updates:
        raise MergeError("the LoRAs hold no modules to merge")
    return updates


def merge_loras(
    base: TensorSource,
    loras: Sequence[tuple[LoraFile, float]],
    unet_map: KeyMap,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The base's tensors with every LoRA update added (fp32 math, cast to ``dtype`` or the base's)."""
    updates = collect_updates(loras, unet_map)
    missing = [k for k in updates if k not in base]
    if missing:
        raise MergeError(f"LoRA targets key {missing[0]!r}, which the base checkpoint {base.name} does not have")
    out: dict[str, torch.Tensor] = {}
    for key in base.keys:
        tensor = base.get(key)
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        if key in updates:
            weight = tensor.to(torch.float32, copy=True)
            for down, up, scale in updates[key]:
                weight.add_(lora_delta(down, up, tuple(weight.shape), key), alpha=scale)
            tensor = weight
        out[key] = tensor.to(target)
    return out


def text_encoder_module_names(base: TensorSource) -> list[str]:
    """Module paths (transformers-5 naming) of the base's text-encoder weights."""
    return sorted({k[len(TEXT_MODEL_PREFIX):].rsplit(".", 1)[0] for k in base.keys
                   if component_of(k) == "text_encoder" and k.startswith(TEXT_MODEL_PREFIX)})


def unet_module_names(unet_map: KeyMap) -> list[str]:
    """Module paths of a UNet from its key map."""
    return sorted({k.rsplit(".", 1)[0] for k in unet_map.to_single})


def describe_loras(paths: Sequence[Path], scales: Sequence[float]) -> list[dict[str, object]]:
    """Settings entry for metadata: file name and scale of each merged LoRA."""
    return [{"file": Path(p).name, "scale": s} for p, s in zip(paths, scales)]
