"""The LoRA family on PEFT: one adapter config per ``lora.type``, LoCon's conv targets, and the adapters read back.

``lora``/``dora`` use PEFT's ``LoraConfig`` (DoRA's magnitude is added by :mod:`.dora`), ``loha`` and
``lokr`` its ``LoHaConfig``/``LoKrConfig``. :func:`adapter_modules` reads the trained layers into the
LyCORIS layout (:mod:`dreamtune.weights.lycoris_formats`) at the scale PEFT applied, relative to the
base as loaded: PiSSA/OLoRA move part of the base weight into the adapter at the start, and that
start is subtracted back (as PEFT's ``path_initial_model_for_weight_conversion`` does, rank doubled).
"""

from __future__ import annotations

import re

import torch

from ...errors import ConfigError
from ...weights.lycoris_formats import LOHA_SUFFIXES, LOKR_SUFFIXES, AdapterModule
from .dora import ADAPTER, PARAM, dora_fused_weight
from .settings import LoraSettings

#: Where LoCon adapts the UNet's 3x3 convolutions (kohya's conv_dim: ResnetBlock2D, Downsample2D, Upsample2D).
CONV_BLOCKS = (".resnets.", ".downsamplers.", ".upsamplers.")

Initial = dict[str, tuple[torch.Tensor, torch.Tensor]]


def conv_targets(unet: torch.nn.Module) -> list[str]:
    """Full paths of the UNet's 3x3 convolutions inside resnets and down/up samplers."""
    return [name for name, m in unet.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) and any(b in f".{name}" for b in CONV_BLOCKS)]


def _matches(pattern: str, name: str) -> bool:
    """PEFT's pattern rule: the pattern matches the end of the module path at a ``.`` boundary."""
    return re.match(rf"(.*\.)?({pattern})$", name) is not None


def check_patterns(s: LoraSettings, adapted: list[str]) -> None:
    """Every rank_pattern/alpha_pattern key must match an adapted module, or it silently does nothing."""
    for key, patterns in (("lora.rank_pattern", s.rank_pattern), ("lora.alpha_pattern", s.alpha_pattern)):
        for pattern in patterns:
            if not any(_matches(pattern, name) for name in adapted):
                raise ConfigError(f"{key}: {pattern!r} matches no adapted module; adapted modules include "
                                  f"{sorted(adapted)[:4]}")


def peft_config(s: LoraSettings, rank: int, alpha: float, targets: list[str], conv: list[str], names: list[str]):
    """The PEFT config for one model: ``targets`` (name suffixes) plus full ``conv`` paths at conv rank/alpha.

    Only the patterns that match one of the model's module ``names`` are passed (the other model's are not its).
    """
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    def own(patterns: dict) -> dict:
        return {k: v for k, v in patterns.items() if any(_matches(k, n) for n in names)}

    conv_alpha = s.conv_alpha or s.conv_rank
    rank_pattern = {**own(s.rank_pattern), **{re.escape(c): s.conv_rank for c in conv}}
    alpha_pattern = {**own(s.alpha_pattern), **{re.escape(c): conv_alpha for c in conv}}
    common = dict(r=rank, target_modules=[*targets, *conv], rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if s.type in ("lora", "dora"):
        return LoraConfig(lora_alpha=alpha, lora_dropout=s.dropout, init_lora_weights=s.init, use_rslora=s.rslora,
                          **common)
    config = LoHaConfig if s.type == "loha" else LoKrConfig
    return config(alpha=alpha, rank_dropout=s.rank_dropout, module_dropout=s.module_dropout, **common)


def initial_adapters(model: torch.nn.Module) -> Initial:
    """``{path: (A0, B0)}`` of every LoRA layer right after PiSSA/OLoRA moved ``s B0 A0`` out of the base."""
    from peft.tuners.lora import LoraLayer

    return {name: (m.lora_A[ADAPTER].weight.detach().clone(), m.lora_B[ADAPTER].weight.detach().clone())
            for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def _lora_module(layer, initial: tuple[torch.Tensor, torch.Tensor] | None) -> AdapterModule:
    down, up = layer.lora_A[ADAPTER].weight.detach().float(), layer.lora_B[ADAPTER].weight.detach().float()
    if initial is not None:  # s (B A - B0 A0) = s [B, -B0] [A; A0]
        down = torch.cat([down, initial[0].float()], dim=0)
        up = torch.cat([up, -initial[1].float()], dim=1)
    tensors = {"lora_down.weight": down, "lora_up.weight": up}
    if hasattr(layer, PARAM):
        weight = layer.get_base_layer().weight
        tensors["dora_scale"] = getattr(layer, PARAM).detach().float().reshape(1, -1, *[1] * (weight.dim() - 2))
    return AdapterModule("lora", tensors, layer.scaling[ADAPTER] * down.shape[0])


def _factor_module(layer, kind: str) -> AdapterModule:
    suffixes = LOHA_SUFFIXES if kind == "loha" else LOKR_SUFFIXES
    tensors = {s: getattr(layer, s)[ADAPTER].detach().float() for s in suffixes if ADAPTER in getattr(layer, s)}
    module = AdapterModule(kind, tensors)
    scale, rank = layer.scaling[ADAPTER], module.rank()
    if rank is None:  # two full LoKr factors: the UIs apply no alpha, so the scale goes into lokr_w1
        tensors["lokr_w1"] = tensors["lokr_w1"] * scale
        module.alpha = float(layer.r[ADAPTER])
    else:
        module.alpha = scale * rank
    return module


def adapter_modules(model: torch.nn.Module, initial: Initial | None = None) -> dict[str, AdapterModule]:
    """``{module path: AdapterModule}`` of every adapted layer, fp32, relative to the base as loaded."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    out: dict[str, AdapterModule] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A:
            out[name] = _lora_module(layer, (initial or {}).get(name))
        elif isinstance(layer, LoHaLayer) and ADAPTER in layer.hada_w1_a:
            out[name] = _factor_module(layer, "loha")
        elif isinstance(layer, LoKrLayer) and ADAPTER in layer.r:
            out[name] = _factor_module(layer, "lokr")
    return out


def fused_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{module path: weight}`` of every adapted layer with its adapter folded in by PEFT's own delta (fp32)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, BaseTunerLayer) and ADAPTER in layer.scaling:
            if hasattr(layer, PARAM):
                out[name] = dora_fused_weight(layer).detach()
            else:
                out[name] = (layer.get_base_layer().weight.float() + layer.get_delta_weight(ADAPTER).float()).detach()
    return out
