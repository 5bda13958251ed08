"""Load the base model's parts from a hub id, a local diffusers folder or a single-file checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import ModelLoadError
from ..weights.single_file import load_single_file_pipeline

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".pth")


@dataclass
class BaseModel:
    """The frozen-by-default parts every trainer starts from."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any
    source: str

    def components(self) -> dict[str, Any]:
        return {
            "tokenizer": self.tokenizer,
            "text_encoder": self.text_encoder,
            "vae": self.vae,
            "unet": self.unet,
        }


def _looks_like_path(value: str) -> bool:
    """A local path, not a hub id: explicit, a weight file name, existing, more than owner/name deep, or under an
    existing local folder (``models/tiny-sd`` beside a ``models/`` folder is a mistyped path, not a repo)."""
    if value.startswith((".", "/", "~")) or value.endswith(SINGLE_FILE_SUFFIXES) or Path(value).exists():
        return True
    parts = Path(value).parts
    return len(parts) > 2 or "\\" in value or (len(parts) == 2 and Path(parts[0]).is_dir())


def _hub_error(cfg: ModelConfig, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"model.pretrained: could not load {cfg.pretrained!r} from the Hugging Face Hub "
        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}).\n"
        "  If this machine is offline or the id is wrong: download the model once "
        f"(`hf download {cfg.pretrained}`) and retry with HF_HUB_OFFLINE=1, or set model.pretrained to a "
        f"local diffusers folder or a single-file .safetensors checkpoint (no local folder {cfg.pretrained} exists "
        f"in {Path.cwd()})."
    )


def _load_folder_or_hub(cfg: ModelConfig) -> dict[str, Any]:
    """Each component with ``from_pretrained`` (subfolders of a diffusers layout)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    common = {"revision": cfg.revision}
    weights = {**common, "variant": cfg.variant}
    source = cfg.pretrained
    return {
        "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights),
        "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", **weights),
        "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights),
        "noise_scheduler": DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common),
    }


def _load_single_file(cfg: ModelConfig) -> dict[str, Any]:
    """Components of a single-file SD 1.x checkpoint, built offline from the shipped configs."""
    from diffusers import DDPMScheduler

    path = Path(cfg.pretrained).expanduser()
    if path.suffix != ".safetensors" and not cfg.allow_pickle:
        raise ModelLoadError(
            f"model.pretrained: {path} is a pickle checkpoint, which can run code when loaded. "
            "Convert it to .safetensors, or set model.allow_pickle=true if you trust the file."
        )
    pipe = load_single_file_pipeline(path, allow_pickle=cfg.allow_pickle)
    return {
        "tokenizer": pipe.tokenizer,
        "text_encoder": pipe.text_encoder,
        "vae": pipe.vae,
        "unet": pipe.unet,
        "noise_scheduler": DDPMScheduler.from_config(pipe.scheduler.config),
    }


def load_base_model(cfg: ModelConfig) -> BaseModel:
    """Load tokenizer, text encoder, VAE, UNet and the DDPM training schedule named by ``cfg``."""
    source = cfg.pretrained
    is_path = _looks_like_path(source)
    path = Path(source).expanduser()
    if is_path and not path.exists():
        raise ModelLoadError(f"model.pretrained: {source} does not exist: no such folder or file at {path.resolve()} "
                             "(expected a diffusers folder or a single-file checkpoint)")
    try:
        if is_path and path.is_file():
            parts = _load_single_file(cfg)
        elif is_path and not (path / "model_index.json").exists() and not (path / "unet").is_dir():
            raise ModelLoadError(
                f"model.pretrained: {source} is not a diffusers folder (no model_index.json or unet/); "
                "point it at a folder saved with save_pretrained or at a single-file .safetensors"
            )
        else:
            parts = _load_folder_or_hub(cfg)
    except ModelLoadError:
        raise
    except Exception as err:
        if is_path:
            raise ModelLoadError(f"model.pretrained: could not load {source}: {type(err).__name__}: {err}") from err
        raise _hub_error(cfg, err) from err
    if cfg.vae:
        from diffusers import AutoencoderKL

        try:
            parts["vae"] = AutoencoderKL.from_pretrained(cfg.vae)
        except Exception as err:
            raise ModelLoadError(f"model.vae: could not load {cfg.vae!r}: {type(err).__name__}: {err}") from err
    if cfg.prediction_type:
        parts["noise_scheduler"].register_to_config(prediction_type=cfg.prediction_type)
    return BaseModel(source=source, **parts)


def load_pipeline(model: str, allow_pickle: bool = False):
    """A StableDiffusionPipeline from a diffusers folder, a hub id or a single-file checkpoint."""
    from diffusers import StableDiffusionPipeline

    if Path(model).is_file():
        return load_single_file_pipeline(model, allow_pickle=allow_pickle)
    return StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
