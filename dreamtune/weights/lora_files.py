"""LoRA files in any spelling (kohya, diffusers, bare PEFT) read into one :class:`LoraFile`, and converted.

Reading recovers PEFT module paths from kohya's flattened names and per-module rank and alpha
from kohya's ``alpha`` tensors or diffusers' adapter metadata (alpha = rank when a file has none).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from ..errors import WeightsError
from .lora_formats import (
    DIFFUSERS_ADAPTER_METADATA_KEY,
    DIFFUSERS_LORA_WEIGHT_NAME,
    LoraFile,
    kohya_metadata,
    most_common,
    peft_to_kohya,
    ranks_and_alphas,
    save_diffusers_lora,
)
from .lora_keys import (
    KOHYA_ALPHA,
    KOHYA_DOWN,
    KOHYA_TEXT_ENCODER_INPUT_PREFIXES,
    KOHYA_UNET_PREFIX,
    KOHYA_UP,
    PEFT_A,
    PEFT_B,
    Part,
    canonical_text_encoder_path,
    check_rank,
    module_resolver,
    split_kohya_prefix,
)
from .embeddings import is_bundle_key
from .safetensors_io import PathLike, load_safetensors, save_safetensors
from .sources import cast_state

# ----------------------------------------------------------------------------- kohya -> PEFT


def kohya_to_peft(
    tensors: Mapping[str, torch.Tensor],
    *,
    unet_module_names: Iterable[str] | None = None,
    text_encoder_module_names: Iterable[str] | None = None,
) -> LoraFile:
    """kohya/A1111 SD 1.x LoRA tensors -> :class:`LoraFile` in PEFT naming.

    kohya flattens ``.`` to ``_`` although module names contain ``_``; names are recovered by
    matching against ``[n for n, _ in model.named_modules()]`` when given, else by an exact split
    into SD 1.x module segments (which refuses names it does not know). A missing alpha, or alpha 0
    (kohya's rule), means alpha = rank.
    """
    resolvers = {
        "unet": module_resolver(unet_module_names, "unet"),
        "text_encoder": module_resolver(text_encoder_module_names, "text_encoder"),
    }
    result = LoraFile("kohya")
    for lora_name, parts in sorted(_kohya_groups(tensors).items()):
        part, flat = split_kohya_prefix(lora_name)
        _add_peft_module(result, part, resolvers[part](flat, lora_name), lora_name, parts)
    return result


def _kohya_groups(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group kohya keys by module name, refusing suffixes other than lora_down/lora_up/alpha."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        lora_name, _, suffix = key.partition(".")
        if suffix not in (KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA):
            raise WeightsError(
                f"kohya key {key!r}: expected <name>.lora_down.weight, .lora_up.weight or .alpha "
                "(LoHa/LoKr/DoRA files are not plain LoRA: read them with lycoris_files.read_adapter)"
            )
        groups.setdefault(lora_name, {})[suffix] = tensor
    if not groups:
        raise WeightsError("kohya_to_peft: the tensor dict is empty")
    return groups


def _add_peft_module(
    result: LoraFile, part: Part, module: str, lora_name: str, parts: Mapping[str, torch.Tensor]
) -> None:
    """Store one kohya module as PEFT lora_A/lora_B plus its rank and alpha."""
    for needed in (KOHYA_DOWN, KOHYA_UP):
        if needed not in parts:
            raise WeightsError(f"kohya module {lora_name!r} has no {needed}")
    down, up = parts[KOHYA_DOWN], parts[KOHYA_UP]
    rank = check_rank(lora_name, down, up)
    alpha = float(parts[KOHYA_ALPHA].item()) if KOHYA_ALPHA in parts else 0.0
    if module in result.ranks:
        raise WeightsError(f"kohya module {lora_name!r} resolves to {module!r}, which another key already uses")
    target = result.unet if part == "unet" else result.text_encoder
    target[module + PEFT_A] = down
    target[module + PEFT_B] = up
    result.ranks[module] = rank
    result.alphas[module] = alpha if alpha != 0 else float(rank)


# ----------------------------------------------------------------------------- any LoRA file


def lora_layout(keys: Sequence[str]) -> str:
    """``kohya``, ``diffusers`` (``unet.``/``text_encoder.`` prefixed PEFT keys), ``peft`` or ``unknown``.

    Embeddings bundled into a kohya file (``bundle_emb.*``) do not change its layout."""
    keys = [k for k in keys if not is_bundle_key(k)]
    if keys and all(k.startswith((KOHYA_UNET_PREFIX, *KOHYA_TEXT_ENCODER_INPUT_PREFIXES, "lora_te2_")) for k in keys):
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
        tensors = {k: v for k, v in tensors.items() if not is_bundle_key(k)}
        lora = kohya_to_peft(tensors, unet_module_names=unet_module_names,
                             text_encoder_module_names=text_encoder_module_names)
        lora.metadata = metadata
        return lora
    if layout == "unknown":
        raise WeightsError(f"{path} is not a LoRA: no lora_down/lora_up or lora_A/lora_B keys")
    unet, text = _split_diffusers(tensors) if layout == "diffusers" else (dict(tensors), {})
    configs = _adapter_configs(metadata)
    lora = LoraFile(layout, unet, text, metadata=metadata)
    for part, state in (("unet", unet), ("text_encoder", text)):
        config = configs.get(part)
        ranks, alphas = ranks_and_alphas(state, config if config and "lora_alpha" in config else None, part)
        lora.ranks.update(ranks)
        lora.alphas.update(alphas)
    return lora


# ----------------------------------------------------------------------------- conversion


def _lora_output(dst: Path) -> tuple[Path, str]:
    """``(folder, weight_name)`` for a diffusers LoRA target given as a file or a folder."""
    if dst.suffix == ".safetensors":
        return dst.parent, dst.name
    return dst, DIFFUSERS_LORA_WEIGHT_NAME


def convert_lora(src: PathLike, dst: PathLike, to: str, dtype: torch.dtype | None,
                 metadata: Mapping[str, str], allow_pickle: bool = False) -> Path:
    """kohya <-> diffusers/PEFT LoRA (``to``: ``kohya`` or ``diffusers``), alpha/rank preserved."""
    lora = read_lora(src, allow_pickle)
    unet, text = cast_state(lora.unet, dtype), cast_state(lora.text_encoder, dtype)
    if to == "kohya":
        tensors = peft_to_kohya(unet or None, text or None, rank=lora.ranks, alpha=lora.alphas)
        header = kohya_metadata(rank=int(most_common(lora.ranks.values())),
                                alpha=float(most_common(lora.alphas.values())),
                                title=Path(dst).stem, tensors=tensors, extra=metadata)
        return save_safetensors(tensors, dst, header)
    if to != "diffusers":
        raise WeightsError(f"a LoRA converts to kohya or diffusers, not {to!r}")
    shaped = dataclasses.replace(lora, unet=unet, text_encoder=text)
    configs = {part: shaped.lora_config_kwargs(part) for part, state in (("unet", unet), ("text_encoder", text))
               if state}
    folder, name = _lora_output(Path(dst))
    return save_diffusers_lora(folder, unet or None, text or None, configs.get("unet"), configs.get("text_encoder"),
                               metadata, weight_name=name)
