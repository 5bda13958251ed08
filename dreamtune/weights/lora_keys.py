"""Module names of LoRA tensors in each spelling: PEFT keys (``<module>.lora_A.weight``) and kohya names.

kohya flattens module paths (``lora_unet_down_blocks_0_...``); :func:`module_resolver` recovers the
dotted path, from a model's module names or, without a model, by an exact split into the segments
of SD 1.x module paths. Text-encoder modules are canonical in transformers-5 naming (no
``text_model.`` level); older transformers' spelling is accepted on input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch

from ..errors import WeightsError

KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_TEXT_ENCODER_PREFIX = "lora_te_"
#: Text-encoder prefixes accepted on input; diffusers' own exporter writes ``lora_te1_`` for SD 1.x.
KOHYA_TEXT_ENCODER_INPUT_PREFIXES = ("lora_te_", "lora_te1_")
KOHYA_DOWN = "lora_down.weight"
KOHYA_UP = "lora_up.weight"
KOHYA_ALPHA = "alpha"

PEFT_A = ".lora_A.weight"
PEFT_B = ".lora_B.weight"
_PEFT_WRAPPER = "base_model.model."
#: The level older transformers put above CLIP text-encoder module paths.
TEXT_MODEL = "text_model."

#: Every segment of the paths of the layers a LoRA can wrap (``Linear``/``Conv2d``) in a diffusers
#: SD 1.x ``UNet2DConditionModel`` and a transformers ``CLIPTextModel``, digits aside. Splitting a
#: kohya name into these is unique (checked over all of SD 1.5), so the fallback that needs no
#: model is exact for SD 1.x and refuses names it does not know.
SD1_MODULE_SEGMENTS = frozenset(
    {
        # UNet2DConditionModel
        "down_blocks", "mid_block", "up_blocks", "attentions", "resnets", "downsamplers",
        "upsamplers", "transformer_blocks", "attn1", "attn2", "to_q", "to_k", "to_v", "to_out",
        "ff", "net", "proj", "proj_in", "proj_out", "conv", "conv1", "conv2", "conv_in",
        "conv_out", "conv_shortcut", "time_emb_proj", "time_embedding", "linear_1", "linear_2",
        # CLIPTextModel (``text_model`` before transformers 5) / CLIPTextModelWithProjection
        "text_model", "encoder", "layers", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
        "mlp", "fc1", "fc2", "text_projection",
    }
)  # fmt: skip
_MAX_SEGMENT_TOKENS = max(len(s.split("_")) for s in SD1_MODULE_SEGMENTS)

Part = Literal["unet", "text_encoder"]
Scalar = int | float
Resolver = Callable[[str, str], str]


# ----------------------------------------------------------------------------- PEFT keys


def canonical_text_encoder_path(path: str) -> str:
    """Text-encoder module path in transformers-5 naming (no ``text_model.`` level)."""
    return path.removeprefix(TEXT_MODEL)


def split_peft_key(key: str) -> tuple[str, str]:
    """``"<module>.lora_A.weight"`` -> ``("<module>", "lora_A")``; anything else raises."""
    key = key.removeprefix(_PEFT_WRAPPER)
    for suffix, kind in ((PEFT_A, "lora_A"), (PEFT_B, "lora_B")):
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    raise WeightsError(
        f"PEFT key {key!r} is not a LoRA lora_A/lora_B weight; kohya files hold only those "
        "(DoRA magnitude vectors, LoRA biases and modules_to_save have no kohya spelling). "
        "Pass the dict from peft.get_peft_model_state_dict(model) of a plain LoRA."
    )


def peft_pairs(
    state: Mapping[str, torch.Tensor] | None, *, what: str, strict: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group a PEFT LoRA state dict into ``{module: (lora_A, lora_B)}``, checking shapes agree."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in (state or {}).items():
        try:
            module, kind = split_peft_key(key)
        except WeightsError:
            if strict:
                raise
            continue
        halves.setdefault(module, {})[kind] = tensor
    pairs = {}
    for module, got in halves.items():
        if set(got) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(got)).pop()
            raise WeightsError(f"{what} LoRA module {module!r} has no {missing}.weight")
        pairs[module] = (got["lora_A"], got["lora_B"])
        check_rank(module, got["lora_A"], got["lora_B"])
    return pairs


def check_rank(module: str, down: torch.Tensor, up: torch.Tensor) -> int:
    """Return the rank, raising if lora_A (rows) and lora_B (columns) disagree."""
    if down.ndim < 2 or up.ndim < 2 or down.shape[0] != up.shape[1]:
        raise WeightsError(
            f"LoRA module {module!r}: down/lora_A {tuple(down.shape)} and up/lora_B "
            f"{tuple(up.shape)} do not share a rank (down rows must equal up columns)"
        )
    return int(down.shape[0])


def _aliases(path: str, part: Part) -> tuple[str, ...]:
    """Names a user may key a per-module value by: the path, and for the text encoder both spellings."""
    if part == "unet":
        return (path,)
    canon = canonical_text_encoder_path(path)
    return (path, canon, TEXT_MODEL + canon)


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first PEFT pattern (``rank_pattern``/``alpha_pattern`` key) matching module ``name``, else None."""
    from peft.utils.other import get_pattern_key  # peft imports transformers: load it only when needed

    keys = list(patterns)
    key = get_pattern_key(keys, name) if keys else name
    return key if key in keys else None


def lookup(values: Scalar | Mapping[str, Scalar], path: str, part: Part, what: str) -> Scalar:
    """Resolve a scalar or per-module mapping (exact path, then PEFT pattern) for one module."""
    if not isinstance(values, Mapping):
        return values
    names = _aliases(path, part)
    for name in names:
        if name in values:
            return values[name]
    for name in names:
        key = pattern_key(values, name)
        if key is not None:
            return values[key]
    raise KeyError(
        f"{what} has no value for {part} module {path!r}; pass a scalar, or a mapping with an "
        "entry (module path or PEFT pattern) for every module, e.g. from lora_config_values()"
    )


def peft_key(key: str) -> str:
    """Strip PeftModel's ``base_model.model.`` wrapper and check the key is a LoRA tensor."""
    key = key.removeprefix(_PEFT_WRAPPER)
    if ".lora_" not in key:
        raise WeightsError(
            f"key {key!r} is not a PEFT LoRA tensor (no '.lora_' in it); "
            "pass peft.get_peft_model_state_dict(model), not the model's full state dict"
        )
    return key


# ----------------------------------------------------------------------------- kohya names


def kohya_name(path: str, part: Part) -> str:
    """kohya module name: prefix + path with dots flattened (text encoder always via ``text_model``)."""
    if part == "unet":
        return KOHYA_UNET_PREFIX + path.replace(".", "_")
    return KOHYA_TEXT_ENCODER_PREFIX + (TEXT_MODEL + canonical_text_encoder_path(path)).replace(".", "_")


def split_kohya_prefix(lora_name: str) -> tuple[Part, str]:
    """``lora_unet_x`` -> ("unet", "x"); ``lora_te[1]_[text_model_]x`` -> ("text_encoder", "x")."""
    if lora_name.startswith(KOHYA_UNET_PREFIX):
        return "unet", lora_name[len(KOHYA_UNET_PREFIX) :]
    for prefix in KOHYA_TEXT_ENCODER_INPUT_PREFIXES:
        if lora_name.startswith(prefix):
            flat = lora_name[len(prefix) :]
            text_model = TEXT_MODEL.replace(".", "_")
            return "text_encoder", flat[len(text_model) :] if flat.startswith(text_model) else flat
    if lora_name.startswith("lora_te2_"):
        raise WeightsError(
            f"kohya module {lora_name!r} targets SDXL's second text encoder; dreamtune is SD 1.x only"
        )
    raise WeightsError(f"kohya module {lora_name!r} starts with neither lora_unet_ nor lora_te_/lora_te1_")


def module_resolver(module_names: Iterable[str] | None, part: Part) -> Resolver:
    """Return ``resolve(flat, lora_name) -> module path`` for ``part``, by model names or SD 1.x segments."""
    if module_names is None:
        return lambda flat, lora_name: _unflatten_sd1(flat, lora_name)
    table = _flat_name_table(module_names, part)

    def resolve(flat: str, lora_name: str) -> str:
        found = table.get(flat)
        if found is None:
            raise WeightsError(
                f"kohya module {lora_name!r}: no {part} module flattens to {flat!r}; "
                "is the LoRA for a different architecture, or were the wrong module names passed?"
            )
        if isinstance(found, tuple):
            raise WeightsError(f"kohya module {lora_name!r} is ambiguous: {found} all flatten to {flat!r}")
        return found

    return resolve


def _flat_name_table(module_names: Iterable[str], part: Part) -> dict[str, str | tuple[str, ...]]:
    """Map flattened (``.`` -> ``_``) module names to names; collisions become a tuple of candidates."""
    table: dict[str, str | tuple[str, ...]] = {}
    for name in module_names:
        if part == "text_encoder":
            name = canonical_text_encoder_path(name)
        if not name or name == TEXT_MODEL.rstrip("."):
            continue
        flat = name.replace(".", "_")
        prior = table.get(flat)
        if prior is None or prior == name:
            table[flat] = name
        else:
            table[flat] = tuple(sorted(set((prior if isinstance(prior, tuple) else (prior,)) + (name,))))
    return table


def _is_sd1_segment(segment: str) -> bool:
    """A digit run or a known SD 1.x module segment."""
    return segment.isdigit() or segment in SD1_MODULE_SEGMENTS


def _unflatten_sd1(flat: str, lora_name: str) -> str:
    """Split a flattened name into SD 1.x segments; raise unless exactly one split exists."""
    tokens = flat.split("_")
    # splits[i]: up to two segmentations of tokens[i:] (two is enough to detect ambiguity)
    splits: list[list[list[str]]] = [[] for _ in range(len(tokens) + 1)]
    splits[len(tokens)] = [[]]
    for i in range(len(tokens) - 1, -1, -1):
        for j in range(i + 1, min(len(tokens), i + _MAX_SEGMENT_TOKENS) + 1):
            segment = "_".join(tokens[i:j])
            if _is_sd1_segment(segment):
                splits[i].extend([segment] + rest for rest in splits[j][: 2 - len(splits[i])])
    if len(splits[0]) != 1:
        problem = "cannot be split into" if not splits[0] else "splits ambiguously into"
        raise WeightsError(
            f"kohya module {lora_name!r} {problem} SD 1.x module names; pass "
            "unet_module_names=/text_encoder_module_names= from model.named_modules()"
        )
    return ".".join(splits[0][0])
