"""lora.init_from: start the adapters from an existing LoRA file (kohya or diffusers, ours or another tool's)."""

from __future__ import annotations

import torch

from ...errors import ConfigError
from ...weights.lora_files import read_lora
from ...weights.lora_keys import Part


def _adapter_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """PEFT LoRA layers of ``module`` by the path of the layer they wrap."""
    return {name: layer for name, layer in module.named_modules()
            if hasattr(layer, "lora_A") and "default" in getattr(layer, "lora_A", {})}


def load_lora_into(path: str, modules: dict[Part, torch.nn.Module], allow_pickle: bool = False) -> int:
    """Copy a LoRA file's down/up weights into the live adapters of ``modules``; return the modules filled.

    The file's alpha/rank scale is carried into the up weights, so the adapters start with exactly the
    file's weight change whatever this run's alpha. Modules the run targets but the file lacks start
    fresh (their up weights are zero: no change).
    """
    layers = {part: _adapter_layers(module) for part, module in modules.items()}
    lora = read_lora(path, allow_pickle, unet_module_names=list(layers.get("unet", {})) or None,
                     text_encoder_module_names=list(layers.get("text_encoder", {})) or None)
    filled = 0
    for part in ("unet", "text_encoder"):
        module_layers = layers.get(part, {})
        for name, (down, up) in lora.modules(part).items():
            layer = module_layers.get(name)
            if layer is None:
                key = "lora.target_modules" if part == "unet" else "lora.text_encoder_target_modules"
                hint = "" if part == "unet" else " and lora.train_text_encoder=true"
                raise ConfigError(f"lora.init_from: {path} holds {part} module {name!r}, which this run does not "
                                  f"train; add it to {key}{hint}")
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if tuple(down.shape) != tuple(a.shape) or tuple(up.shape) != tuple(b.shape):
                what = "rank" if down.shape[1:] == a.shape[1:] and up.shape[0] == b.shape[0] else "base model"
                raise ConfigError(
                    f"lora.init_from: {path} module {name!r} has down {tuple(down.shape)} / up {tuple(up.shape)} but "
                    f"this run's adapter is {tuple(a.shape)} / {tuple(b.shape)}: a different {what}. "
                    + ("Set lora.rank (or text_encoder_rank) to the file's rank." if what == "rank" else
                       "Train on the base the LoRA was made for (model.pretrained).")
                )
            ratio = lora.scale(name) / layer.scaling["default"]
            with torch.no_grad():
                a.copy_(down.to(a.dtype))
                b.copy_((up.float() * ratio).to(b.dtype))
            filled += 1
    if not filled:
        raise ConfigError(f"lora.init_from: {path} holds no module this run trains")
    return filled
