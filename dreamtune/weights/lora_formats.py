"""LoRA files for SD 1.x: PEFT <-> kohya/A1111 keys, kohya metadata, and diffusers' LoRA file.

Three spellings of the same adapter:

* **PEFT** (what ``peft.get_peft_model_state_dict`` returns): ``<module>.lora_A.weight`` /
  ``<module>.lora_B.weight``; scale ``lora_alpha / r`` lives in the ``LoraConfig``, not the tensors.
  UNet modules use diffusers names (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``);
  text-encoder modules use transformers-5 names (``encoder.layers.0.self_attn.q_proj``; older
  transformers added a ``text_model.`` level, accepted on input).
* **kohya / A1111 / ComfyUI**: ``lora_unet_<module with . -> _>.lora_down.weight`` (= lora_A),
  ``.lora_up.weight`` (= lora_B) and a 0-dim ``.alpha`` per module, scale ``alpha / rank``; text
  encoder ``lora_te_text_model_encoder_layers_0_self_attn_q_proj...`` (always with ``text_model``).
* **diffusers** ``pytorch_lora_weights.safetensors``: PEFT keys prefixed ``unet.`` and
  ``text_encoder.``. Its loader assumes alpha = rank unless adapter metadata is in the header;
  :func:`save_diffusers_lora` folds alpha/rank into ``lora_B`` so every loader gets the trained scale.

diffusers 0.42 loads our kohya files exactly when each model (UNet, text encoder) has one alpha;
per-module alphas inside one model are mis-applied by its kohya converter (attention alphas are
dropped, mixed text-encoder alphas fail to load). A1111/ComfyUI read per-module alphas correctly;
for diffusers, the folded ``pytorch_lora_weights.safetensors`` is exact in every case.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .safetensors_io import (
    PathLike,
    content_sha256,
    modelspec_metadata,
    save_safetensors,
    stringify_metadata,
)

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
#: Text-encoder prefixes accepted on input; diffusers' own exporter writes ``lora_te1_`` for SD 1.x.
TEXT_ENCODER_INPUT_PREFIXES = ("lora_te_", "lora_te1_")
KOHYA_DOWN = "lora_down.weight"
KOHYA_UP = "lora_up.weight"
KOHYA_ALPHA = "alpha"

#: File name ``StableDiffusionPipeline.load_lora_weights(folder)`` looks for first.
DIFFUSERS_LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: Header key under which diffusers (>= 0.34) keeps ``LoraConfig`` kwargs per component.
DIFFUSERS_ADAPTER_METADATA_KEY = "lora_adapter_metadata"

KOHYA_ARCHITECTURE = "stable-diffusion-v1/lora"
KOHYA_BASE_MODEL_VERSION = "sd_v1"

_PEFT_A = ".lora_A.weight"
_PEFT_B = ".lora_B.weight"
_PEFT_WRAPPER = "base_model.model."
_TEXT_MODEL = "text_model."

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


@dataclass
class KohyaLora:
    """A kohya LoRA in PEFT naming: per-model ``lora_A``/``lora_B`` dicts plus per-module rank/alpha."""

    unet: dict[str, torch.Tensor] = field(default_factory=dict)
    text_encoder: dict[str, torch.Tensor] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)

    def lora_config_kwargs(self, part: Part) -> dict[str, Any]:
        """``LoraConfig`` kwargs that rebuild this adapter on ``part`` with the file's scales."""
        state = self.unet if part == "unet" else self.text_encoder
        paths = sorted(_peft_pairs(state, what=part))
        if not paths:
            raise ValueError(f"this kohya LoRA has no {part} modules")
        return _lora_config_kwargs({p: self.ranks[p] for p in paths}, {p: self.alphas[p] for p in paths})


# ----------------------------------------------------------------------------- PEFT key helpers


def canonical_text_encoder_path(path: str) -> str:
    """Text-encoder module path in transformers-5 naming (no ``text_model.`` level)."""
    return path[len(_TEXT_MODEL) :] if path.startswith(_TEXT_MODEL) else path


def split_peft_key(key: str) -> tuple[str, str]:
    """``"<module>.lora_A.weight"`` -> ``("<module>", "lora_A")``; anything else raises."""
    key = key[len(_PEFT_WRAPPER) :] if key.startswith(_PEFT_WRAPPER) else key
    for suffix, kind in ((_PEFT_A, "lora_A"), (_PEFT_B, "lora_B")):
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    raise ValueError(
        f"PEFT key {key!r} is not a LoRA lora_A/lora_B weight; kohya files hold only those "
        "(DoRA magnitude vectors, LoRA biases and modules_to_save have no kohya spelling). "
        "Pass the dict from peft.get_peft_model_state_dict(model) of a plain LoRA."
    )


def _peft_pairs(
    state: Mapping[str, torch.Tensor] | None, *, what: str, strict: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group a PEFT LoRA state dict into ``{module: (lora_A, lora_B)}``, checking shapes agree."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in (state or {}).items():
        try:
            module, kind = split_peft_key(key)
        except ValueError:
            if strict:
                raise
            continue
        halves.setdefault(module, {})[kind] = tensor
    pairs = {}
    for module, got in halves.items():
        if set(got) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(got)).pop()
            raise ValueError(f"{what} LoRA module {module!r} has no {missing}.weight")
        pairs[module] = (got["lora_A"], got["lora_B"])
        _check_rank(module, got["lora_A"], got["lora_B"])
    return pairs


def _check_rank(module: str, down: torch.Tensor, up: torch.Tensor) -> int:
    """Return the rank, raising if lora_A (rows) and lora_B (columns) disagree."""
    if down.ndim < 2 or up.ndim < 2 or down.shape[0] != up.shape[1]:
        raise ValueError(
            f"LoRA module {module!r}: down/lora_A {tuple(down.shape)} and up/lora_B "
            f"{tuple(up.shape)} do not share a rank (down rows must equal up columns)"
        )
    return int(down.shape[0])


def _aliases(path: str, part: Part) -> tuple[str, ...]:
    """Names a user may key a per-module value by: the path, and for the text encoder both spellings."""
    if part == "unet":
        return (path,)
    canon = canonical_text_encoder_path(path)
    return (path, canon, _TEXT_MODEL + canon)


def _pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first PEFT pattern (``rank_pattern``/``alpha_pattern`` key) matching module ``name``, else None."""
    from peft.utils.other import get_pattern_key  # peft imports transformers: load it only when needed

    keys = list(patterns)
    key = get_pattern_key(keys, name) if keys else name
    return key if key in keys else None


def _lookup(values: Scalar | Mapping[str, Scalar], path: str, part: Part, what: str) -> Scalar:
    """Resolve a scalar or per-module mapping (exact path, then PEFT pattern) for one module."""
    if not isinstance(values, Mapping):
        return values
    names = _aliases(path, part)
    for name in names:
        if name in values:
            return values[name]
    for name in names:
        key = _pattern_key(values, name)
        if key is not None:
            return values[key]
    raise KeyError(
        f"{what} has no value for {part} module {path!r}; pass a scalar, or a mapping with an "
        "entry (module path or PEFT pattern) for every module, e.g. from lora_config_values()"
    )


def _config_dict(config: Any) -> dict[str, Any]:
    """A ``LoraConfig`` or its ``to_dict()`` as a plain dict."""
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"expected a peft LoraConfig or its to_dict(), got {type(config).__name__}")


def lora_config_values(
    lora_state: Mapping[str, torch.Tensor], config: Any
) -> tuple[dict[str, int], dict[str, float]]:
    """Per-module rank and kohya alpha (``scale * rank``) of a PEFT LoRA, read from its ``LoraConfig``.

    Honours ``lora_alpha``, ``alpha_pattern`` and ``use_rslora`` (scale ``alpha / sqrt(r)``) the
    way peft does, so ``alpha / rank`` of the result is exactly the scale peft applied in training.
    """
    cfg = _config_dict(config)
    default_alpha = float(cfg["lora_alpha"])
    pattern = dict(cfg.get("alpha_pattern") or {})
    rslora = bool(cfg.get("use_rslora", False))
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for module, (down, up) in _peft_pairs(lora_state, what="PEFT", strict=False).items():
        rank = _check_rank(module, down, up)
        key = _pattern_key(pattern, module)
        alpha = float(pattern[key]) if key is not None else default_alpha
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        ranks[module] = rank
        alphas[module] = scale * rank
    return ranks, alphas


def _lora_config_kwargs(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, Any]:
    """Smallest ``LoraConfig`` kwargs (most common r/alpha + patterns) reproducing per-module values."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {m: v for m, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {m: v for m, v in sorted(alphas.items()) if v != alpha},
        "target_modules": sorted(ranks),
    }


# ----------------------------------------------------------------------------- PEFT -> kohya


def _kohya_name(path: str, part: Part) -> str:
    """kohya module name: prefix + path with dots flattened (text encoder always via ``text_model``)."""
    if part == "unet":
        return UNET_PREFIX + path.replace(".", "_")
    return TEXT_ENCODER_PREFIX + (_TEXT_MODEL + canonical_text_encoder_path(path)).replace(".", "_")


def peft_to_kohya(
    unet_lora: Mapping[str, torch.Tensor] | None,
    text_encoder_lora: Mapping[str, torch.Tensor] | None,
    *,
    rank: int | Mapping[str, int],
    alpha: Scalar | Mapping[str, Scalar],
) -> dict[str, torch.Tensor]:
    """PEFT LoRA dicts -> kohya/A1111 tensors (``lora_down``/``lora_up``/0-dim ``alpha`` per module).

    ``rank``/``alpha`` are scalars or per-module mappings (module path or PEFT pattern, e.g. from
    :func:`lora_config_values`); ``rank`` must match the tensors. Conv (4-D) weights pass unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    parts: tuple[tuple[Part, Mapping[str, torch.Tensor] | None], ...] = (
        ("unet", unet_lora),
        ("text_encoder", text_encoder_lora),
    )
    for part, state in parts:
        for module, (down, up) in _peft_pairs(state, what=part).items():
            _add_kohya_module(out, module, part, down, up, rank, alpha)
    if not out:
        raise ValueError("peft_to_kohya: both unet_lora and text_encoder_lora are empty; nothing to convert")
    return out


def _add_kohya_module(
    out: dict[str, torch.Tensor],
    module: str,
    part: Part,
    down: torch.Tensor,
    up: torch.Tensor,
    rank: int | Mapping[str, int],
    alpha: Scalar | Mapping[str, Scalar],
) -> None:
    """Write one module's three kohya tensors into ``out``, checking rank and name collisions."""
    actual = _check_rank(module, down, up)
    expected = int(_lookup(rank, module, part, "rank"))
    if expected != actual:
        raise ValueError(
            f"{part} module {module!r}: rank={expected} was given but lora_A has {actual} rows; "
            "pass the rank it was trained with (per module if peft rank_pattern was used)"
        )
    name = _kohya_name(module, part)
    if f"{name}.{KOHYA_DOWN}" in out:
        raise ValueError(f"two {part} modules map to kohya name {name!r} (was {module!r} given twice?)")
    out[f"{name}.{KOHYA_DOWN}"] = down
    out[f"{name}.{KOHYA_UP}"] = up
    out[f"{name}.{KOHYA_ALPHA}"] = torch.tensor(float(_lookup(alpha, module, part, "alpha")))


# ----------------------------------------------------------------------------- kohya -> PEFT


def kohya_to_peft(
    tensors: Mapping[str, torch.Tensor],
    *,
    unet_module_names: Iterable[str] | None = None,
    text_encoder_module_names: Iterable[str] | None = None,
) -> KohyaLora:
    """kohya/A1111 SD 1.x LoRA tensors -> :class:`KohyaLora` in PEFT naming.

    kohya flattens ``.`` to ``_`` although module names contain ``_``; names are recovered by
    matching against ``[n for n, _ in model.named_modules()]`` when given, else by an exact split
    into SD 1.x module segments (which refuses names it does not know). A missing alpha, or alpha 0
    (kohya's rule), means alpha = rank.
    """
    resolvers = {
        "unet": _resolver(unet_module_names, "unet"),
        "text_encoder": _resolver(text_encoder_module_names, "text_encoder"),
    }
    result = KohyaLora()
    for lora_name, parts in sorted(_kohya_groups(tensors).items()):
        part, flat = _split_kohya_prefix(lora_name)
        _add_peft_module(result, part, resolvers[part](flat, lora_name), lora_name, parts)
    return result


def _kohya_groups(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group kohya keys by module name, refusing suffixes other than lora_down/lora_up/alpha."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        lora_name, _, suffix = key.partition(".")
        if suffix not in (KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA):
            raise ValueError(
                f"kohya key {key!r}: expected <name>.lora_down.weight, .lora_up.weight or .alpha "
                "(LyCORIS/LoHa/LoKr/DoRA files are not plain LoRA and cannot be converted)"
            )
        groups.setdefault(lora_name, {})[suffix] = tensor
    if not groups:
        raise ValueError("kohya_to_peft: the tensor dict is empty")
    return groups


def _split_kohya_prefix(lora_name: str) -> tuple[Part, str]:
    """``lora_unet_x`` -> ("unet", "x"); ``lora_te[1]_[text_model_]x`` -> ("text_encoder", "x")."""
    if lora_name.startswith(UNET_PREFIX):
        return "unet", lora_name[len(UNET_PREFIX) :]
    for prefix in TEXT_ENCODER_INPUT_PREFIXES:
        if lora_name.startswith(prefix):
            flat = lora_name[len(prefix) :]
            text_model = _TEXT_MODEL.replace(".", "_")
            return "text_encoder", flat[len(text_model) :] if flat.startswith(text_model) else flat
    if lora_name.startswith("lora_te2_"):
        raise ValueError(
            f"kohya module {lora_name!r} targets SDXL's second text encoder; dreamtune is SD 1.x only"
        )
    raise ValueError(f"kohya module {lora_name!r} starts with neither lora_unet_ nor lora_te_/lora_te1_")


def _add_peft_module(
    result: KohyaLora, part: Part, module: str, lora_name: str, parts: Mapping[str, torch.Tensor]
) -> None:
    """Store one kohya module as PEFT lora_A/lora_B plus its rank and alpha."""
    for needed in (KOHYA_DOWN, KOHYA_UP):
        if needed not in parts:
            raise ValueError(f"kohya module {lora_name!r} has no {needed}")
    down, up = parts[KOHYA_DOWN], parts[KOHYA_UP]
    rank = _check_rank(lora_name, down, up)
    alpha = float(parts[KOHYA_ALPHA].item()) if KOHYA_ALPHA in parts else 0.0
    if module in result.ranks:
        raise ValueError(f"kohya module {lora_name!r} resolves to {module!r}, which another key already uses")
    target = result.unet if part == "unet" else result.text_encoder
    target[module + _PEFT_A] = down
    target[module + _PEFT_B] = up
    result.ranks[module] = rank
    result.alphas[module] = alpha if alpha != 0 else float(rank)


def _resolver(module_names: Iterable[str] | None, part: Part):
    """Return ``resolve(flat, lora_name) -> module path`` for ``part``, by model names or SD 1.x segments."""
    if module_names is None:
        return lambda flat, lora_name: _unflatten_sd1(flat, lora_name)
    table = _flat_name_table(module_names, part)

    def resolve(flat: str, lora_name: str) -> str:
        found = table.get(flat)
        if found is None:
            raise ValueError(
                f"kohya module {lora_name!r}: no {part} module flattens to {flat!r}; "
                "is the LoRA for a different architecture, or were the wrong module names passed?"
            )
        if isinstance(found, tuple):
            raise ValueError(f"kohya module {lora_name!r} is ambiguous: {found} all flatten to {flat!r}")
        return found

    return resolve


def _flat_name_table(module_names: Iterable[str], part: Part) -> dict[str, str | tuple[str, ...]]:
    """Map flattened (``.`` -> ``_``) module names to names; collisions become a tuple of candidates."""
    table: dict[str, str | tuple[str, ...]] = {}
    for name in module_names:
        if part == "text_encoder":
            name = canonical_text_encoder_path(name)
        if not name or name == _TEXT_MODEL.rstrip("."):
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
        raise ValueError(
            f"kohya module {lora_name!r} {problem} SD 1.x module names; pass "
            "unet_module_names=/text_encoder_module_names= from model.named_modules()"
        )
    return ".".join(splits[0][0])


# ----------------------------------------------------------------------------- kohya metadata


def kohya_metadata(
    *,
    rank: int,
    alpha: float,
    title: str,
    output_name: str | None = None,
    steps: int | None = None,
    epoch: int | None = None,
    seed: int | None = None,
    resolution: int | tuple[int, int] = 512,
    trigger_phrase: str | None = None,
    training_comment: str | None = None,
    base_model: str | None = None,
    learning_rate: float | None = None,
    unet_lr: float | None = None,
    text_encoder_lr: float | None = None,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    prediction_type: Literal["epsilon", "v"] = "epsilon",
    description: str | None = None,
    author: str | None = None,
    license: str | None = None,
    date: _dt.datetime | str | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Header metadata kohya sd-scripts writes for an SD 1.x LoRA: ``ss_*`` keys plus ``modelspec.*``.

    Values are strings as kohya writes them (``ss_network_dim="4"``, ``ss_network_alpha="8.0"``).
    With ``tensors`` the content hash is added (``sshs_model_hash``, ``modelspec.hash_sha256``),
    which A1111 uses to index files. ``extra`` keys are added last and win.
    """
    meta: dict[str, Any] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": int(rank),
        "ss_network_alpha": float(alpha),
        "ss_network_args": _conv_network_args(conv_rank, conv_alpha),
        "ss_base_model_version": KOHYA_BASE_MODEL_VERSION,
        "ss_v2": False,
        "ss_output_name": output_name or title,
        "ss_training_comment": training_comment,
        "ss_steps": steps,
        "ss_epoch": epoch,
        "ss_seed": seed,
        "ss_resolution": str(_resolution_pair(resolution)),
        "ss_sd_model_name": base_model,
        "ss_learning_rate": learning_rate,
        "ss_unet_lr": unet_lr,
        "ss_text_encoder_lr": text_encoder_lr,
    }
    meta.update(
        modelspec_metadata(
            architecture=KOHYA_ARCHITECTURE,
            implementation="diffusers",
            title=title,
            resolution=_resolution_pair(resolution),
            trigger_phrase=trigger_phrase,
            prediction_type=prediction_type,
            description=description,
            author=author,
            license=license,
            date=date,
        )
    )
    if tensors is not None:
        digest = content_sha256(tensors)
        meta["sshs_model_hash"] = digest
        meta["modelspec.hash_sha256"] = "0x" + digest
    meta.update(extra or {})
    return stringify_metadata(meta)


def _conv_network_args(conv_rank: int | None, conv_alpha: float | None) -> str | None:
    """kohya's ``ss_network_args`` JSON for conv LoRA (``conv_dim``/``conv_alpha``), else None."""
    if conv_rank is None:
        return None
    alpha = conv_alpha if conv_alpha is not None else conv_rank
    return json.dumps({"conv_dim": str(int(conv_rank)), "conv_alpha": str(float(alpha))})


def _resolution_pair(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """``512`` -> ``(512, 512)``."""
    if isinstance(resolution, int):
        return (resolution, resolution)
    width, height = resolution
    return (int(width), int(height))


# ----------------------------------------------------------------------------- diffusers layout


def diffusers_lora_state_dict(
    unet_lora: Mapping[str, torch.Tensor] | None,
    text_encoder_lora: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """PEFT dicts -> the ``unet.``/``text_encoder.`` key layout of ``pytorch_lora_weights.safetensors``.

    Text-encoder keys are written ``text_encoder.text_model.<module>``: diffusers strips the
    ``text_model.`` level for transformers 5, while older diffusers and ComfyUI need it.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in (unet_lora or {}).items():
        out["unet." + _peft_key(key)] = tensor
    for key, tensor in (text_encoder_lora or {}).items():
        out["text_encoder." + _TEXT_MODEL + canonical_text_encoder_path(_peft_key(key))] = tensor
    if not out:
        raise ValueError("diffusers_lora_state_dict: both unet_lora and text_encoder_lora are empty")
    return out


def _peft_key(key: str) -> str:
    """Strip PeftModel's ``base_model.model.`` wrapper and check the key is a LoRA tensor."""
    key = key[len(_PEFT_WRAPPER) :] if key.startswith(_PEFT_WRAPPER) else key
    if ".lora_" not in key:
        raise ValueError(
            f"key {key!r} is not a PEFT LoRA tensor (no '.lora_' in it); "
            "pass peft.get_peft_model_state_dict(model), not the model's full state dict"
        )
    return key


def fold_alpha(
    lora_state: Mapping[str, torch.Tensor], ranks: Mapping[str, int], alphas: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """Multiply each module's ``lora_B`` (weight and bias) by ``alpha / rank`` so the file needs scale 1."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in lora_state.items():
        module, sep, _ = _peft_key(key).rpartition(".lora_B.")
        if sep and module in ranks and alphas[module] != ranks[module]:
            tensor = (tensor.float() * (alphas[module] / ranks[module])).to(tensor.dtype)
        out[key] = tensor
    return out


def save_diffusers_lora(
    output_dir: PathLike,
    unet_lora: Mapping[str, torch.Tensor] | None,
    text_encoder_lora: Mapping[str, torch.Tensor] | None = None,
    unet_lora_config: Any = None,
    text_encoder_lora_config: Any = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    weight_name: str = DIFFUSERS_LORA_WEIGHT_NAME,
) -> Path:
    """Write ``<output_dir>/pytorch_lora_weights.safetensors`` that loads at the trained strength.

    diffusers' loader assumes alpha = rank for files without adapter metadata (and ComfyUI/A1111
    ignore that metadata), so a LoRA trained with alpha != rank would change strength. We fold
    ``alpha / rank`` (from each ``LoraConfig``, or its ``to_dict()``; None means alpha = rank)
    into ``lora_B`` and also store diffusers' ``lora_adapter_metadata`` declaring alpha = rank:
    every loader then applies exactly the trained scale. Returns the file path.
    """
    header = stringify_metadata(metadata)
    for reserved in ("format", DIFFUSERS_ADAPTER_METADATA_KEY):
        if reserved in header:
            raise ValueError(f"metadata key {reserved!r} is written by save_diffusers_lora; remove it")
    folded: dict[Part, dict[str, torch.Tensor]] = {}
    adapter_meta: dict[str, Any] = {}
    for part, state, config in (
        ("unet", unet_lora, unet_lora_config),
        ("text_encoder", text_encoder_lora, text_encoder_lora_config),
    ):
        if state:
            folded[part], adapter_meta[part] = _fold_part(state, config, part)
    state_dict = diffusers_lora_state_dict(folded.get("unet"), folded.get("text_encoder"))
    packed = {f"{part}.{k}": v for part, kwargs in adapter_meta.items() for k, v in kwargs.items()}
    header["format"] = "pt"
    header[DIFFUSERS_ADAPTER_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    return save_safetensors(state_dict, Path(output_dir) / weight_name, header)


def _fold_part(
    state: Mapping[str, torch.Tensor], config: Any, part: Part
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fold one component's alpha into lora_B; return it with the diffusers adapter metadata (alpha = r)."""
    if config is None:
        ranks = {m: _check_rank(m, a, b) for m, (a, b) in _peft_pairs(state, what=part, strict=False).items()}
        alphas = {m: float(r) for m, r in ranks.items()}
    else:
        ranks, alphas = lora_config_values(state, config)
    if not ranks:
        raise ValueError(f"{part} LoRA has no lora_A/lora_B pairs")
    folded = fold_alpha(state, ranks, alphas)
    if part == "text_encoder":
        ranks = {canonical_text_encoder_path(m): r for m, r in ranks.items()}
    kwargs = _lora_config_kwargs(ranks, {m: float(r) for m, r in ranks.items()})
    keys = [_peft_key(k) for k in state]
    kwargs["use_dora"] = any(".lora_magnitude_vector" in k for k in keys)
    kwargs["lora_bias"] = any(".lora_B.bias" in k for k in keys)
    return folded, kwargs
