"""Merge math of the LoRA family as A1111 and ComfyUI apply it: each module's update, DoRA's re-normalisation.

For a module with file scale ``s_f`` (see :class:`~dreamtune.weights.lycoris_formats.AdapterModule`)
and user strength ``s``: ``W += s * s_f * delta`` (LoRA: ``up @ down``, LoHa: the Hadamard product of
two low-rank products, LoKr: a Kronecker product). With a DoRA ``dora_scale`` ``[1, in]``:
``W' = (W + s_f * delta) * dora_scale / ||W + s_f * delta||`` (norm over the output axis for every
input column) and ``W += s * (W' - W)``. Several files targeting one weight apply in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ldm_keys import KeyMap
from .lycoris_formats import DORA_SCALE, AdapterFile, AdapterModule
from .merge import MergeError, lora_delta, target_key
from .sources import TensorSource


def _tucker(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """LyCORIS' Tucker rebuild: core ``[r, r, kh, kw]``, ``w_a [r, out]``, ``w_b [r, in]`` -> ``[out, in, kh, kw]``."""
    return torch.einsum("i j k l, j r, i p -> p r k l", core.float(), w_b.float(), w_a.float())


def _reshape(delta: torch.Tensor, target_shape: tuple[int, ...], key: str) -> torch.Tensor:
    """``delta`` as the target weight's shape; a mismatch of sizes names the key."""
    if delta.numel() != torch.Size(target_shape).numel():
        raise MergeError(f"adapter for {key!r} makes a {tuple(delta.shape)} update but the checkpoint weight is "
                         f"{tuple(target_shape)}: is the file for another model?")
    return delta.reshape(target_shape)


def loha_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(w1_a @ w1_b) * (w2_a @ w2_b)`` (or the Tucker rebuild of each), unscaled, fp32."""
    if "hada_t1" in t:
        first = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        return first * _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    return (t["hada_w1_a"].float() @ t["hada_w1_b"].float()) * (t["hada_w2_a"].float() @ t["hada_w2_b"].float())


def lokr_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """``kron(w1, w2)`` with each factor full or rebuilt from its split (Tucker for ``lokr_t2``), unscaled, fp32."""
    w1 = t["lokr_w1"].float() if "lokr_w1" in t else t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()
    if "lokr_w2" in t:
        w2 = t["lokr_w2"].float()
    elif "lokr_t2" in t:
        w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"].float() @ t["lokr_w2_b"].float()
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1.contiguous(), w2.contiguous())


def module_delta(module: AdapterModule, target_shape: tuple[int, ...], key: str) -> torch.Tensor:
    """The module's update at file scale (``alpha / r`` applied), shaped like the target weight."""
    t = module.tensors
    if module.kind == "lora":
        delta = lora_delta(t["lora_down.weight"], t["lora_up.weight"], target_shape, key)
    elif module.kind == "loha":
        delta = _reshape(loha_delta(t), target_shape, key)
    elif module.kind == "lokr":
        delta = _reshape(lokr_delta(t), target_shape, key)
    else:
        raise MergeError(f"{key}: unknown adapter kind {module.kind!r}")
    return delta * module.scale()


def input_axis_norm(weight: torch.Tensor) -> torch.Tensor:
    """Norm over the output axis (and kernel) for every input column, shaped ``[1, in, 1, ...]``."""
    flat = weight.transpose(0, 1).reshape(weight.shape[1], -1)
    return flat.norm(dim=1).reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, key: str) -> torch.Tensor:
    """``(W + delta) * dora_scale / ||W + delta||`` with the scale on the input axis."""
    merged = weight + delta
    scale = dora_scale.float()
    if scale.numel() != weight.shape[1] or scale.shape[0] != 1:
        raise MergeError(
            f"{key}: dora_scale {tuple(dora_scale.shape)} is not on the input axis ([1, {weight.shape[1]}, ...]); "
            "output-axis DoRA files are read differently by A1111 and ComfyUI, so they are not merged"
        )
    return merged * (scale.reshape(1, weight.shape[1], *[1] * (weight.dim() - 2)) / input_axis_norm(merged))


def apply_module(weight: torch.Tensor, module: AdapterModule, strength: float, key: str) -> torch.Tensor:
    """``weight`` (fp32) with one module applied at ``strength``, as the UIs patch it."""
    delta = module_delta(module, tuple(weight.shape), key)
    if module.dora:
        return weight + strength * (dora_weight(weight, delta, module.tensors[DORA_SCALE], key) - weight)
    return weight + strength * delta


Update = tuple[AdapterModule, float]


def collect_module_updates(files: Sequence[tuple[AdapterFile, float]], unet_map: KeyMap) -> dict[str, list[Update]]:
    """``{canonical checkpoint key: [(module, strength), ...]}`` in file order."""
    updates: dict[str, list[Update]] = {}
    for adapters, strength in files:
        for part, path, module in adapters.parts():
            updates.setdefault(target_key(part, path, unet_map), []).append((module, strength))
    if not updates:
        raise MergeError("the adapter files hold no modules to merge")
    return updates


def merge_adapters(
    base: TensorSource,
    files: Sequence[tuple[AdapterFile, float]],
    unet_map: KeyMap,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The base's tensors with every adapter applied (fp32 math, cast to ``dtype`` or the base's)."""
    updates = collect_module_updates(files, unet_map)
    missing = [k for k in updates if k not in base]
    if missing:
        raise MergeError(f"adapter targets key {missing[0]!r}, which the base checkpoint {base.name} does not have")
    out: dict[str, torch.Tensor] = {}
    for key in base.keys:
        tensor = base.get(key)
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        if key in updates:
            weight = tensor.to(torch.float32, copy=True)
            for module, strength in updates[key]:
                weight = apply_module(weight, module, strength, key)
            tensor = weight
        out[key] = tensor.to(target)
    return out


def patch_models(adapters: AdapterFile, models: dict[str, torch.nn.Module], strength: float) -> int:
    """Apply every module of ``adapters`` to the live ``models`` (``unet``, ``text_encoder``) in place; return the count.

    What a UI does when it loads the file: the same math as :func:`merge_adapters`, on loaded modules.
    """
    count = 0
    for part, path, module in adapters.parts():
        try:
            layer = models[part].get_submodule(path)
        except AttributeError as err:
            raise MergeError(f"the {part} has no module {path!r}: is the file for another model?") from err
        with torch.no_grad():
            weight = apply_module(layer.weight.float(), module, strength, f"{part}.{path}")
            layer.weight.copy_(weight.to(layer.weight.dtype))
        count += 1
    return count
