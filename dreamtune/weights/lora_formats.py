"""LoRA spellings for SD 1.x: the LoraFile record, PEFT -> kohya/A1111 tensors, kohya metadata, diffusers' file.

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

Module names in each spelling are in :mod:`~dreamtune.weights.lora_keys`; reading any spelling back
into a :class:`LoraFile` and converting files is in :mod:`~dreamtune.weights.lora_files`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from ..errors import WeightsError
from .lora_keys import (
    KOHYA_ALPHA,
    KOHYA_DOWN,
    KOHYA_UP,
    TEXT_MODEL,
    Part,
    Scalar,
    canonical_text_encoder_path,
    check_rank,
    kohya_name,
    lookup,
    pattern_key,
    peft_key,
    peft_pairs,
)
from .safetensors_io import (
    PathLike,
    content_sha256,
    modelspec_metadata,
    save_safetensors,
    stringify_metadata,
)

#: File name ``StableDiffusionPipeline.load_lora_weights(folder)`` looks for first.
DIFFUSERS_LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: Header key under which diffusers (>= 0.34) keeps ``LoraConfig`` kwargs per component.
DIFFUSERS_ADAPTER_METADATA_KEY = "lora_adapter_metadata"

KOHYA_ARCHITECTURE = "stable-diffusion-v1/lora"
KOHYA_BASE_MODEL_VERSION = "sd_v1"

T = TypeVar("T", bound=Hashable)


@dataclass
class LoraFile:
    """A LoRA in PEFT naming (``<module>.lora_A.weight``) per model, with per-module rank and alpha.

    ``layout`` names the spelling it was read from (``kohya``, ``diffusers`` or ``peft``).
    """

    layout: str
    unet: dict[str, torch.Tensor] = field(default_factory=dict)
    text_encoder: dict[str, torch.Tensor] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def modules(self, part: Part) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (lora_A, lora_B)}`` of ``part`` (``unet`` or ``text_encoder``)."""
        return peft_pairs(self.unet if part == "unet" else self.text_encoder, what=part)

    def scale(self, module: str) -> float:
        """``alpha / rank`` of one module."""
        return self.alphas[module] / self.ranks[module]

    def lora_config_kwargs(self, part: Part) -> dict[str, Any]:
        """``LoraConfig`` kwargs that rebuild this adapter on ``part`` with the file's scales."""
        paths = sorted(self.modules(part))
        if not paths:
            raise WeightsError(f"this {self.layout} LoRA has no {part} modules")
        return lora_config_kwargs({p: self.ranks[p] for p in paths}, {p: self.alphas[p] for p in paths})


# ----------------------------------------------------------------------------- rank and alpha


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
    for module, (down, up) in peft_pairs(lora_state, what="PEFT", strict=False).items():
        rank = check_rank(module, down, up)
        key = pattern_key(pattern, module)
        alpha = float(pattern[key]) if key is not None else default_alpha
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        ranks[module] = rank
        alphas[module] = scale * rank
    return ranks, alphas


def ranks_and_alphas(
    state: Mapping[str, torch.Tensor], config: Any, what: str
) -> tuple[dict[str, int], dict[str, float]]:
    """Per-module rank and alpha from a ``LoraConfig`` (see :func:`lora_config_values`); None means alpha = rank."""
    if config is not None:
        return lora_config_values(state, config)
    ranks = {m: check_rank(m, a, b) for m, (a, b) in peft_pairs(state, what=what, strict=False).items()}
    return ranks, {m: float(r) for m, r in ranks.items()}


def most_common(values: Iterable[T]) -> T:
    """The most frequent value (the first seen among equals)."""
    return Counter(values).most_common(1)[0][0]


def lora_config_kwargs(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, Any]:
    """Smallest ``LoraConfig`` kwargs (most common r/alpha + patterns) reproducing per-module values."""
    r = most_common(ranks.values())
    alpha = most_common(alphas.values())
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {m: v for m, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {m: v for m, v in sorted(alphas.items()) if v != alpha},
        "target_modules": sorted(ranks),
    }


# ----------------------------------------------------------------------------- PEFT -> kohya


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
        for module, (down, up) in peft_pairs(state, what=part).items():
            _add_kohya_module(out, module, part, down, up, rank, alpha)
    if not out:
        raise WeightsError("peft_to_kohya: both unet_lora and text_encoder_lora are empty; nothing to convert")
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
    actual = check_rank(module, down, up)
    expected = int(lookup(rank, module, part, "rank"))
    if expected != actual:
        raise WeightsError(
            f"{part} module {module!r}: rank={expected} was given but lora_A has {actual} rows; "
            "pass the rank it was trained with (per module if peft rank_pattern was used)"
        )
    name = kohya_name(module, part)
    if f"{name}.{KOHYA_DOWN}" in out:
        raise WeightsError(f"two {part} modules map to kohya name {name!r} (was {module!r} given twice?)")
    out[f"{name}.{KOHYA_DOWN}"] = down
    out[f"{name}.{KOHYA_UP}"] = up
    out[f"{name}.{KOHYA_ALPHA}"] = torch.tensor(float(lookup(alpha, module, part, "alpha")))


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
        out["unet." + peft_key(key)] = tensor
    for key, tensor in (text_encoder_lora or {}).items():
        out["text_encoder." + TEXT_MODEL + canonical_text_encoder_path(peft_key(key))] = tensor
    if not out:
        raise WeightsError("diffusers_lora_state_dict: both unet_lora and text_encoder_lora are empty")
    return out


def fold_alpha(
    lora_state: Mapping[str, torch.Tensor], ranks: Mapping[str, int], alphas: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """Multiply each module's ``lora_B`` (weight and bias) by ``alpha / rank`` so the file needs scale 1."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in lora_state.items():
        module, sep, _ = peft_key(key).rpartition(".lora_B.")
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
            raise WeightsError(f"metadata key {reserved!r} is written by save_diffusers_lora; remove it")
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
    ranks, alphas = ranks_and_alphas(state, config, part)
    if not ranks:
        raise WeightsError(f"{part} LoRA has no lora_A/lora_B pairs")
    folded = fold_alpha(state, ranks, alphas)
    if part == "text_encoder":
        ranks = {canonical_text_encoder_path(m): r for m, r in ranks.items()}
    kwargs = lora_config_kwargs(ranks, {m: float(r) for m, r in ranks.items()})
    keys = [peft_key(k) for k in state]
    kwargs["use_dora"] = any(".lora_magnitude_vector" in k for k in keys)
    kwargs["lora_bias"] = any(".lora_B.bias" in k for k in keys)
    return folded, kwargs
