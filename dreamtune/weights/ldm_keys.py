"""Key maps between diffusers' SD 1.x modules and the CompVis/LDM single-file layout.

Every map is derived from the model's own config: the set of diffusers keys comes from the model
class instantiated on the meta device (no memory, no weights), and each key is renamed through a
module-level prefix table built from ``block_out_channels``, ``layers_per_block`` and the block
types. A key the table does not cover, a table entry no key falls under, or two keys landing on
one name is an error, so a model of any depth (our 2-level tiny UNet as well as SD 1.5's 4 levels)
maps completely or not at all. This is the trap diffusers' own converter falls into: it hard-codes
SD 1.5's layout and silently drops the weights of smaller models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import torch

from ..errors import WeightsError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
TEXT_MODEL_PREFIX = TEXT_PREFIX + "text_model."

#: Top-level CLIP text-model children; every text-encoder weight lives under one of them.
TEXT_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")


def component_of(key: str) -> str:
    """``unet``, ``vae``, ``text_encoder`` or ``other`` for a single-file key."""
    if key.startswith(UNET_PREFIX):
        return "unet"
    if key.startswith(VAE_PREFIX):
        return "vae"
    if key.startswith(TEXT_PREFIX):
        return "text_encoder"
    return "other"

_UNET_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UNET_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_UNET_MID_TYPES = ("UNetMidBlock2DCrossAttn",)
_VAE_DOWN_TYPES = ("DownEncoderBlock2D",)
_VAE_UP_TYPES = ("UpDecoderBlock2D",)

#: UNet config options that add or rename modules the SD 1.x layout does not have: name -> allowed.
_UNET_FIXED_OPTIONS: dict[str, tuple[Any, ...]] = {
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_type": ("positional",),
    "num_class_embeds": (None,),
    "dual_cross_attention": (False,),
    "attention_type": ("default",),
}

# Renames of the first component after a module prefix (diffusers -> LDM); "" = unchanged.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_IDENTITY: dict[str, str] = {}

#: VAE attention projections are Linear [C, C] in diffusers and 1x1 Conv2d [C, C, 1, 1] in LDM.
_VAE_CONV1X1_PARTS = ("to_q", "to_k", "to_v", "to_out.0")


class KeyMapError(WeightsError):
    """A config or state dict that the SD 1.x single-file layout cannot represent exactly."""


@dataclass(frozen=True)
class KeyMap:
    """A complete, one-to-one diffusers <-> single-file map for one component."""

    component: str
    to_single: dict[str, str]
    to_diffusers: dict[str, str]
    shapes: dict[str, torch.Size]
    conv1x1: frozenset[str]


# ---------------------------------------------------------------------------------------------
# config checks
# ---------------------------------------------------------------------------------------------


def _per_level(value: int | list[int], levels: int, name: str) -> list[int]:
    """Expand an int-or-list config value to one entry per level."""
    if isinstance(value, int):
        return [value] * levels
    values = list(value)
    if len(values) != levels:
        raise KeyMapError(f"{name} has {len(values)} entries for {levels} levels")
    return values


def _check_types(types: list[str], allowed: Any, name: str, model: str) -> None:
    """Refuse block types the SD 1.x layout has no names for."""
    for block_type in types:
        if block_type not in allowed:
            raise KeyMapError(
                f"{model} {name} contains {block_type!r}; the SD 1.x single-file layout only has "
                f"{sorted(allowed)}. This model is not an SD 1.x-style {model}."
            )


def check_unet_config(config: Mapping[str, Any]) -> None:
    """Refuse UNet configs whose modules the SD 1.x single-file layout cannot name."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    _check_types(down, _UNET_DOWN_TYPES, "down_block_types", "UNet")
    _check_types(up, _UNET_UP_TYPES, "up_block_types", "UNet")
    _check_types([config.get("mid_block_type") or _UNET_MID_TYPES[0]], _UNET_MID_TYPES,
                 "mid_block_type", "UNet")
    levels = len(config["block_out_channels"])
    if len(down) != levels or len(up) != levels:
        raise KeyMapError(
            f"UNet config has {levels} block_out_channels but {len(down)} down and {len(up)} up "
            "block types; they must agree"
        )
    for option, allowed in _UNET_FIXED_OPTIONS.items():
        if config.get(option, allowed[0]) not in allowed:
            raise KeyMapError(
                f"UNet config sets {option}={config[option]!r}; SD 1.x checkpoints have no such "
                f"modules (expected {allowed[0]!r})"
            )


def check_vae_config(config: Mapping[str, Any]) -> None:
    """Refuse VAE configs whose modules the SD 1.x single-file layout cannot name."""
    _check_types(list(config["down_block_types"]), _VAE_DOWN_TYPES, "down_block_types", "VAE")
    _check_types(list(config["up_block_types"]), _VAE_UP_TYPES, "up_block_types", "VAE")
    levels = len(config["block_out_channels"])
    if len(config["down_block_types"]) != levels or len(config["up_block_types"]) != levels:
        raise KeyMapError("VAE config: block_out_channels and block types differ in length")


# ---------------------------------------------------------------------------------------------
# module-level prefix tables, derived from the configs
# ---------------------------------------------------------------------------------------------

Table = dict[str, tuple[str, dict[str, str]]]


def unet_module_table(config: Mapping[str, Any]) -> Table:
    """Map each diffusers UNet module prefix to its LDM prefix and the renames inside it."""
    check_unet_config(config)
    levels = len(config["block_out_channels"])
    layers = _per_level(config["layers_per_block"], levels, "layers_per_block")
    table: Table = {
        "conv_in": ("input_blocks.0.0", _IDENTITY),
        "time_embedding.linear_1": ("time_embed.0", _IDENTITY),
        "time_embedding.linear_2": ("time_embed.2", _IDENTITY),
        "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET),
        "mid_block.attentions.0": ("middle_block.1", _IDENTITY),
        "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET),
        "conv_norm_out": ("out.0", _IDENTITY),
        "conv_out": ("out.2", _IDENTITY),
    }
    table.update(_unet_down_table(config["down_block_types"], layers))
    table.update(_unet_up_table(config["up_block_types"], layers[::-1]))
    return table


def _unet_down_table(block_types: list[str], layers: list[int]) -> Table:
    """input_blocks.N: one per down resnet (attention at .1), then one per downsampler (.0.op)."""
    table: Table = {}
    index = 1
    for level, (block_type, count) in enumerate(zip(block_types, layers)):
        down = f"down_blocks.{level}"
        for j in range(count):
            table[f"{down}.resnets.{j}"] = (f"input_blocks.{index}.0", _UNET_RESNET)
            if _UNET_DOWN_TYPES[block_type]:
                table[f"{down}.attentions.{j}"] = (f"input_blocks.{index}.1", _IDENTITY)
            index += 1
        if level < len(block_types) - 1:
            table[f"{down}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", _IDENTITY)
            index += 1
    return table


def _unet_up_table(block_types: list[str], layers: list[int]) -> Table:
    """output_blocks.N: resnet at .0, attention at .1, the level's upsampler after them."""
    table: Table = {}
    index = 0
    for level, (block_type, count) in enumerate(zip(block_types, layers)):
        up, has_attention = f"up_blocks.{level}", _UNET_UP_TYPES[block_type]
        for j in range(count + 1):
            table[f"{up}.resnets.{j}"] = (f"output_blocks.{index}.0", _UNET_RESNET)
            if has_attention:
                table[f"{up}.attentions.{j}"] = (f"output_blocks.{index}.1", _IDENTITY)
            if j == count and level < len(block_types) - 1:
                slot = 2 if has_attention else 1
                table[f"{up}.upsamplers.0.conv"] = (f"output_blocks.{index}.{slot}.conv", _IDENTITY)
            index += 1
    return table


def vae_module_table(config: Mapping[str, Any]) -> Table:
    """Map each diffusers VAE module prefix to its LDM prefix and the renames inside it."""
    check_vae_config(config)
    levels = len(config["block_out_channels"])
    layers = _per_level(config["layers_per_block"], levels, "layers_per_block")
    table: Table = {}
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in"] = (f"{part}.conv_in", _IDENTITY)
        table[f"{part}.conv_norm_out"] = (f"{part}.norm_out", _IDENTITY)
        table[f"{part}.conv_out"] = (f"{part}.conv_out", _IDENTITY)
        table[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", _VAE_RESNET)
        table[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", _VAE_RESNET)
        if config.get("mid_block_add_attention", True):
            table[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION)
    for level in range(levels):
        for j in range(layers[level]):
            table[f"encoder.down_blocks.{level}.resnets.{j}"] = (f"encoder.down.{level}.block.{j}",
                                                                 _VAE_RESNET)
        if level < levels - 1:
            table[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (
                f"encoder.down.{level}.downsample.conv", _IDENTITY)
    for level in range(levels):
        ldm_level = levels - 1 - level
        for j in range(layers[ldm_level] + 1):
            table[f"decoder.up_blocks.{level}.resnets.{j}"] = (f"decoder.up.{ldm_level}.block.{j}",
                                                               _VAE_RESNET)
        if level < levels - 1:
            table[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = (
                f"decoder.up.{ldm_level}.upsample.conv", _IDENTITY)
    if config.get("use_quant_conv", True):
        table["quant_conv"] = ("quant_conv", _IDENTITY)
    if config.get("use_post_quant_conv", True):
        table["post_quant_conv"] = ("post_quant_conv", _IDENTITY)
    return table


# ---------------------------------------------------------------------------------------------
# full key maps
# ---------------------------------------------------------------------------------------------


def _rename_inside(rest: str, renames: dict[str, str], key: str) -> str:
    """Rename the first component(s) of ``rest`` (the part after a module prefix)."""
    if not renames:
        return rest
    for old, new in renames.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    raise KeyMapError(f"no LDM name for {key!r}: {rest!r} is not one of {sorted(renames)}")


def _split_on_table(key: str, table: Table) -> tuple[str, str] | None:
    """Find the longest dotted prefix of ``key`` that is a table entry; return (prefix, rest)."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in table:
            return prefix, ".".join(parts[n:])
    return None


def build_key_map(component: str, shapes: Mapping[str, torch.Size], table: Table,
                  prefix: str) -> KeyMap:
    """Rename every diffusers key through ``table``; fail on uncovered keys, unused rows, clashes."""
    to_single: dict[str, str] = {}
    used: set[str] = set()
    conv1x1: set[str] = set()
    uncovered = []
    for key in shapes:
        split = _split_on_table(key, table)
        if split is None:
            uncovered.append(key)
            continue
        module, rest = split
        ldm_module, renames = table[module]
        to_single[key] = f"{prefix}{ldm_module}.{_rename_inside(rest, renames, key)}"
        used.add(module)
        if renames is _VAE_ATTENTION and rest.endswith(".weight") and \
                rest.startswith(_VAE_CONV1X1_PARTS):
            conv1x1.add(key)
    if uncovered:
        raise KeyMapError(
            f"{component}: {len(uncovered)} weights have no single-file name under this config "
            f"(first: {uncovered[:5]}); the model is not an SD 1.x-style {component}"
        )
    unused = sorted(set(table) - used)
    if unused:
        raise KeyMapError(f"{component}: config implies modules the model lacks: {unused[:5]}")
    to_diffusers = {v: k for k, v in to_single.items()}
    if len(to_diffusers) != len(to_single):
        raise KeyMapError(f"{component}: two weights map to one single-file name")
    return KeyMap(component, to_single, to_diffusers, dict(shapes), frozenset(conv1x1))


def _config_key(config: Mapping[str, Any]) -> str:
    """A hashable, order-independent form of a config for caching."""
    return json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")},
                      sort_keys=True, default=list)


def meta_shapes(model_cls: type, config: Mapping[str, Any]) -> dict[str, torch.Size]:
    """State-dict shapes of ``model_cls`` built from ``config`` on the meta device (no memory)."""
    with torch.device("meta"):
        model = model_cls.from_config(dict(config))
    return {k: v.shape for k, v in model.state_dict().items()}


@lru_cache(maxsize=16)
def _unet_key_map_cached(config_json: str) -> KeyMap:
    """Build (once per distinct config) the UNet key map."""
    from diffusers import UNet2DConditionModel

    config = json.loads(config_json)
    table = unet_module_table(config)
    return build_key_map("UNet", meta_shapes(UNet2DConditionModel, config), table, UNET_PREFIX)


@lru_cache(maxsize=16)
def _vae_key_map_cached(config_json: str) -> KeyMap:
    """Build (once per distinct config) the VAE key map."""
    from diffusers import AutoencoderKL

    config = json.loads(config_json)
    table = vae_module_table(config)
    return build_key_map("VAE", meta_shapes(AutoencoderKL, config), table, VAE_PREFIX)


def unet_key_map(config: Mapping[str, Any]) -> KeyMap:
    """The complete diffusers <-> single-file key map of the UNet that ``config`` describes."""
    return _unet_key_map_cached(_config_key(config))


def vae_key_map(config: Mapping[str, Any]) -> KeyMap:
    """The complete diffusers <-> single-file key map of the VAE that ``config`` describes."""
    return _vae_key_map_cached(_config_key(config))


@lru_cache(maxsize=1)
def text_encoder_has_text_model_level() -> bool:
    """Whether the installed transformers' CLIPTextModel state-dict keys start ``text_model.``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                            num_attention_heads=1, max_position_embeddings=4, projection_dim=8,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device("meta"):
        keys = CLIPTextModel(config).state_dict().keys()
    return any(k.startswith("text_model.") for k in keys)
