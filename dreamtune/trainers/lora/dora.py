"""DoRA on PEFT LoRA layers with the magnitude on the input axis, the layout A1111 and ComfyUI read.

The trained weight is ``W' = (W + s B A) * m / ||W + s B A||``, the norm over the output axis for
every input column, so ``W' x = (W + s B A)(g * x)`` with ``g = m / norm``: a forward pre-hook
scales the layer's input and the PEFT layer does the rest (bias untouched). PEFT's own ``use_dora``
normalises each output row instead, which no UI reads, so its files could not reproduce the model.
The norm is treated as a constant in the backward pass, as in the DoRA paper and PEFT.
"""

from __future__ import annotations

import torch

ADAPTER = "default"
PARAM = "dora_scale"


def input_axis_norm(weight: torch.Tensor) -> torch.Tensor:
    """``[in]``: the norm of each input column over the output axis (and kernel)."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)


def _column_norm(layer) -> torch.Tensor:
    """Norm of the layer's current ``W + s B A`` per input column, without gradient."""
    with torch.no_grad():
        weight = layer.get_base_layer().weight.float()
        return input_axis_norm(weight + layer.get_delta_weight(ADAPTER).float())


def _scale_input(layer, args):
    """Forward pre-hook: multiply the input's channel axis by ``m / ||W + s B A||``."""
    if layer.disable_adapters or layer.merged or ADAPTER not in layer.active_adapters:
        return None
    x = args[0]
    gain = (getattr(layer, PARAM) / _column_norm(layer)).to(x.dtype)
    shape = (1, -1, *[1] * (x.dim() - 2)) if isinstance(layer.get_base_layer(), torch.nn.Conv2d) else (-1,)
    return (x * gain.view(shape), *args[1:])


def add_dora(model: torch.nn.Module) -> int:
    """Give every PEFT LoRA layer of ``model`` a trainable magnitude (``<layer>.dora_scale``, fp32), start = the norm."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A:
            layer.register_parameter(PARAM, torch.nn.Parameter(_column_norm(layer).clone()))
            layer.register_forward_pre_hook(_scale_input)
            count += 1
    return count


def dora_fused_weight(layer) -> torch.Tensor:
    """The layer's weight with its adapter and magnitude folded in (fp32): what the UIs rebuild from the file."""
    weight = layer.get_base_layer().weight.float() + layer.get_delta_weight(ADAPTER).float()
    gain = getattr(layer, PARAM).float() / input_axis_norm(weight)
    return weight * gain.view(1, -1, *[1] * (weight.dim() - 2))
