"""Stable Diffusion 1.x single-file checkpoints <-> diffusers, in both directions.

The single-file layout is what AUTOMATIC1111, ComfyUI and InvokeAI load from a checkpoint folder:
``model.diffusion_model.*`` (LDM UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.transformer.text_model.*`` (CLIP text encoder). The key maps come from the
models' configs (see :mod:`dreamtune.weights.ldm_keys`) and every conversion checks that each key
is mapped, in both directions: nothing is dropped, nothing is left over.

:func:`pipeline_from_state` is the one place weights/ builds a ``StableDiffusionPipeline``: from a
single-file state dict and the configs and tokenizer of a diffusers folder (by default the SD 1.5
set shipped in ``sd1_configs/``), fully offline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..models.pipeline import build_pipeline, resolve_scheduler
from ..models.wrappers import bare_module
from .diffusers_folder import SD1_CONFIG_DIR, load_clip_tokenizer, read_config
from .ldm_keys import (
    TEXT_MODEL_PREFIX,
    TEXT_PREFIX,
    TEXT_ROOTS,
    UNET_PREFIX,
    VAE_PREFIX,
    KeyMap,
    KeyMapError,
    text_encoder_has_text_model_level,
    unet_key_map,
    vae_key_map,
)
from .safetensors_io import PathLike, load_safetensors, modelspec_metadata, save_safetensors
from .sources import cast_floating

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

ARCHITECTURE = "stable-diffusion-v1"
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"

#: Non-weight entries SD 1.x checkpoints carry (the LDM noise schedule, EMA bookkeeping, CLIP's
#: position-id buffer): known harmless, dropped on read by exact name.
HARMLESS_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "model_ema.decay", "model_ema.num_updates",
    TEXT_MODEL_PREFIX + "embeddings.position_ids", TEXT_PREFIX + "embeddings.position_ids",
})  # fmt: skip

#: Whole groups dropped on read: ``model_ema.*`` holds the EMA copy of the UNet in training
#: checkpoints (flattened names); the live ``model.diffusion_model.*`` weights are the ones loaded.
HARMLESS_PREFIXES = ("model_ema.",)


class SingleFileError(KeyMapError):
    """A single-file checkpoint that is not a complete SD 1.x model for the given configs."""


# ---------------------------------------------------------------------------------------------
# layout detection
# ---------------------------------------------------------------------------------------------


def detect_layout(keys: Iterable[str]) -> str:
    """Name the layout of a state dict (or its keys) so callers can route it to a converter.

    Returns one of ``single_file`` (SD 1.x), ``single_file_sd2``, ``single_file_sdxl``,
    ``diffusers_unet``, ``diffusers_vae``, ``diffusers_text_encoder`` or ``unknown``.
    """
    names = set(keys)
    if any(k.startswith("conditioner.") for k in names):
        return "single_file_sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in names):
        return "single_file_sd2"
    if any(k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)) for k in names):
        return "single_file"
    if "time_embedding.linear_1.weight" in names and "conv_in.weight" in names:
        return "diffusers_unet"
    if "encoder.conv_in.weight" in names and "decoder.conv_out.weight" in names:
        return "diffusers_vae"
    token_embedding = "embeddings.token_embedding.weight"
    if names & {token_embedding, "text_model." + token_embedding}:
        return "diffusers_text_encoder"
    return "unknown"


def refuse_non_sd1(keys: Iterable[str]) -> None:
    """Raise with a clear message when a single-file checkpoint is SD 2.x or SDXL."""
    layout = detect_layout(keys)
    if layout == "single_file_sd2":
        raise SingleFileError(
            "this checkpoint is Stable Diffusion 2.x (OpenCLIP text encoder, keys "
            "'cond_stage_model.model.*'); dreamtune supports SD 1.x only"
        )
    if layout == "single_file_sdxl":
        raise SingleFileError(
            "this checkpoint is Stable Diffusion XL (keys 'conditioner.*'); dreamtune supports "
            "SD 1.x only"
        )


# ---------------------------------------------------------------------------------------------
# diffusers -> single file
# ---------------------------------------------------------------------------------------------


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Cast floating-point tensors to ``dtype`` (None keeps them); integer tensors are kept."""
    return cast_floating(tensor.detach(), dtype).contiguous()


def _check_key_sets(got: Iterable[str], expected: Iterable[str], component: str, hint: str) -> None:
    """Fail naming missing and unexpected keys unless ``got`` and ``expected`` are equal sets."""
    got_set, expected_set = set(got), set(expected)
    missing, extra = sorted(expected_set - got_set), sorted(got_set - expected_set)
    if missing or extra:
        raise SingleFileError(
            f"{component} weights do not match its config: {len(missing)} missing "
            f"(first: {missing[:3]}), {len(extra)} unexpected (first: {extra[:3]}). {hint}"
        )


def _check_shape(key: str, tensor: torch.Tensor, expected: torch.Size, component: str) -> None:
    """Fail naming the key when a tensor's shape differs from what the config implies."""
    if tuple(tensor.shape) != tuple(expected):
        raise SingleFileError(
            f"{component} weight {key!r} has shape {tuple(tensor.shape)} but the config implies "
            f"{tuple(expected)}: pass the configs of the model these weights belong to"
        )


def _component_to_single(state_dict: Mapping[str, torch.Tensor], key_map: KeyMap,
                         dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Rename one diffusers component into single-file names; every key must map."""
    _check_key_sets(state_dict, key_map.to_single, key_map.component,
                    "Pass the config the model was built from, and merge LoRA/PEFT adapters into "
                    "the weights first (merge_and_unload / fuse_lora).")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        _check_shape(key, tensor, key_map.shapes[key], key_map.component)
        if key in key_map.conv1x1:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[key_map.to_single[key]] = _cast(tensor, dtype)
    return out


def _text_to_single(state_dict: Mapping[str, torch.Tensor],
                    dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Prefix CLIP text-encoder keys (either transformers naming) with the single-file root."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        rest = key.removeprefix("text_model.")
        if rest == "embeddings.position_ids":
            continue
        if not rest.startswith(TEXT_ROOTS):
            raise SingleFileError(
                f"text-encoder key {key!r} is not part of a CLIPTextModel (expected keys under "
                f"{', '.join(TEXT_ROOTS)}); pass CLIPTextModel.state_dict()"
            )
        out[TEXT_MODEL_PREFIX + rest] = _cast(tensor, dtype)
    if not out:
        raise SingleFileError("the text-encoder state dict is empty")
    return out


def diffusers_to_single_file(
    unet_sd: Mapping[str, torch.Tensor],
    vae_sd: Mapping[str, torch.Tensor],
    text_encoder_sd: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    dtype: torch.dtype | None = torch.float16,
) -> dict[str, torch.Tensor]:
    """Build the SD 1.x single-file state dict from diffusers component state dicts.

    ``dtype`` casts floating-point tensors (fp16 by default, as UIs expect); None keeps them.
    Raises :class:`SingleFileError` if any component key has no single-file name or is missing.
    """
    out = _component_to_single(unet_sd, unet_key_map(unet_config), dtype)
    out.update(_component_to_single(vae_sd, vae_key_map(vae_config), dtype))
    out.update(_text_to_single(text_encoder_sd, dtype))
    return out


# ---------------------------------------------------------------------------------------------
# single file -> diffusers
# ---------------------------------------------------------------------------------------------


def _text_key_from_single(key: str, level: str) -> str | None:
    """The transformers key of a single-file text-encoder key, or None if it is not one."""
    if key.startswith(TEXT_MODEL_PREFIX):
        rest = key[len(TEXT_MODEL_PREFIX):]
    elif key.startswith(TEXT_PREFIX):
        rest = key[len(TEXT_PREFIX):]
    else:
        return None
    return level + rest if rest.startswith(TEXT_ROOTS) else None


def _is_harmless(key: str, ignore_prefixes: tuple[str, ...]) -> bool:
    """Whether ``key`` is a known non-weight entry (or one the caller chose to ignore)."""
    return key in HARMLESS_KEYS or key.startswith(HARMLESS_PREFIXES + tuple(ignore_prefixes))


def _raise_unmapped(unmapped: list[str]) -> None:
    """Fail naming the keys that belong to no component and are not known harmless."""
    raise SingleFileError(
        f"{len(unmapped)} key(s) in the checkpoint are not weights of the SD 1.x UNet, VAE or text "
        f"encoder described by the configs, nor known harmless extras: {sorted(unmapped)[:5]}. "
        "If the file is another model (inpainting, SD 2, a LoRA) it cannot be loaded as SD 1.x; "
        "if it was saved from a different architecture, pass its configs (CLI: --config-dir DIR; Python: config_dir=DIR); if "
        "these keys are harmless, pass ignore_prefixes=(...) naming them."
    )


def _component_from_single(found: Mapping[str, torch.Tensor], key_map: KeyMap,
                           hint: str) -> dict[str, torch.Tensor]:
    """Check one component is complete, undo 1x1-conv storage of VAE attention, check shapes."""
    _check_key_sets(found, key_map.to_single, key_map.component, hint)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in found.items():
        if key in key_map.conv1x1 and tensor.ndim == 4 and tuple(tensor.shape[2:]) == (1, 1):
            tensor = tensor.reshape(tensor.shape[:2])
        _check_shape(key, tensor, key_map.shapes[key], key_map.component)
        out[key] = tensor
    return out


def single_file_to_diffusers(
    tensors: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    *,
    ignore_prefixes: tuple[str, ...] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a single-file SD 1.x state dict into diffusers (unet, vae, text_encoder) state dicts.

    Text-encoder keys come back in the installed transformers' naming (with or without the
    ``text_model.`` level). Known harmless extras (:data:`HARMLESS_KEYS`, ``model_ema.*``) are
    dropped; any other unmapped key, and any weight the configs need but the file lacks, raises.
    """
    refuse_non_sd1(tensors)
    unet_map, vae_map = unet_key_map(unet_config), vae_key_map(vae_config)
    level = "text_model." if text_encoder_has_text_model_level() else ""
    unet, vae, text, unmapped = {}, {}, {}, []
    for key, tensor in tensors.items():
        if key in unet_map.to_diffusers:
            unet[unet_map.to_diffusers[key]] = tensor
        elif key in vae_map.to_diffusers:
            vae[vae_map.to_diffusers[key]] = tensor
        elif _is_harmless(key, ignore_prefixes):
            continue
        elif (name := _text_key_from_single(key, level)) is not None:
            text[name] = tensor
        else:
            unmapped.append(key)
    if unmapped:
        _raise_unmapped(unmapped)
    if not text:
        raise SingleFileError(
            f"the checkpoint has no text encoder (no '{TEXT_MODEL_PREFIX}*' keys)")
    hint = ("The file is incomplete, or it was saved from a model with other configs: pass those "
            "(CLI: --config-dir <diffusers folder of that model>; Python: config_dir=...).")
    return (_component_from_single(unet, unet_map, hint),
            _component_from_single(vae, vae_map, hint), text)


# ---------------------------------------------------------------------------------------------
# files and pipelines
# ---------------------------------------------------------------------------------------------


def _components(pipe_or_components: Any) -> dict[str, Any]:
    """Get unet, vae, text_encoder (and scheduler if any) from a pipeline or a mapping."""
    get = (pipe_or_components.get if isinstance(pipe_or_components, Mapping)
           else lambda name: getattr(pipe_or_components, name, None))
    parts = {name: get(name) for name in ("unet", "vae", "text_encoder", "scheduler")}
    missing = [name for name in ("unet", "vae", "text_encoder") if parts[name] is None]
    if missing:
        raise SingleFileError(f"cannot save a single file without {missing}: pass a "
                              "StableDiffusionPipeline or a dict with unet, vae and text_encoder")
    return parts


def checkpoint_metadata(title: str, extra: Mapping[str, Any] | None = None, *, resolution: int | None = None,
                        prediction_type: str | None = None) -> dict[str, Any]:
    """SAI model-spec keys for an SD 1.x single-file checkpoint, then ``extra`` (which wins)."""
    spec = modelspec_metadata(architecture=ARCHITECTURE, implementation=IMPLEMENTATION, title=title,
                              resolution=resolution, prediction_type=prediction_type)
    return spec | {"format": "pt"} | dict(extra or {})


def save_single_file(
    pipe_or_components: Any,
    path: PathLike,
    dtype: torch.dtype | None = torch.float16,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write an SD 1.x pipeline (or {unet, vae, text_encoder}) as one single-file checkpoint.

    fp16 by default; SAI model-spec metadata is written, overridden by ``metadata``. Atomic.
    """
    parts = _components(pipe_or_components)
    unet, vae, text_encoder = (bare_module(parts[n]) for n in ("unet", "vae", "text_encoder"))
    tensors = diffusers_to_single_file(
        unet.state_dict(), vae.state_dict(), text_encoder.state_dict(),
        dict(unet.config), dict(vae.config), dtype=dtype,
    )
    prediction = getattr(getattr(parts["scheduler"], "config", None), "prediction_type", "epsilon")
    resolution = vae.config.get("sample_size")
    header = checkpoint_metadata(Path(path).stem, metadata,
                                 resolution=int(resolution) if isinstance(resolution, int) else None,
                                 prediction_type="v" if prediction == "v_prediction" else "epsilon")
    return save_safetensors(tensors, path, header)


def _materialize(build: Callable[[], torch.nn.Module], state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 component: str) -> torch.nn.Module:
    """Build a model without allocating weights, check ``state_dict`` fits, then adopt it."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = build()
    expected = model.state_dict()
    hint = "Pass the configs of the model this file was saved from (CLI: --config-dir DIR; Python: config_dir=DIR)."
    _check_key_sets(state_dict, expected, component, hint)
    for key, tensor in state_dict.items():
        _check_shape(key, tensor, expected[key].shape, component)
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    return model.eval()


def pipeline_from_state(
    state: Mapping[str, torch.Tensor],
    config_dir: PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    *,
    ignore_prefixes: tuple[str, ...] = (),
) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` from a single-file SD 1.x state dict, fully offline.

    Configs and tokenizer come from ``config_dir`` (a diffusers folder) or, by default, from the
    SD 1.5 set shipped in ``sd1_configs/``. ``torch_dtype`` None loads float32.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(config_dir) if config_dir is not None else SD1_CONFIG_DIR
    unet_config, vae_config = read_config(folder, "unet"), read_config(folder, "vae")
    text_config = CLIPTextConfig.from_dict(read_config(folder, "text_encoder"))
    unet_sd, vae_sd, text_sd = single_file_to_diffusers(
        state, unet_config, vae_config, ignore_prefixes=ignore_prefixes)
    dtype = torch_dtype or torch.float32
    return build_pipeline(
        load_clip_tokenizer(folder / "tokenizer"),
        _materialize(lambda: CLIPTextModel(text_config), text_sd, dtype, "text encoder"),
        _materialize(lambda: AutoencoderKL.from_config(vae_config), vae_sd, dtype, "VAE"),
        _materialize(lambda: UNet2DConditionModel.from_config(unet_config), unet_sd, dtype, "UNet"),
        resolve_scheduler(read_config(folder, "scheduler")),
        progress_bar=True,
    )


def load_single_file_pipeline(
    path: PathLike,
    config_dir: PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    *,
    allow_pickle: bool = False,
    ignore_prefixes: tuple[str, ...] = (),
) -> StableDiffusionPipeline:
    """:func:`pipeline_from_state` of a single-file checkpoint; pickled ``.ckpt`` files only with ``allow_pickle``."""
    tensors, _ = load_safetensors(path, allow_pickle=allow_pickle)
    return pipeline_from_state(tensors, config_dir, torch_dtype, ignore_prefixes=ignore_prefixes)
