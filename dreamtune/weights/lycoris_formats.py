"""The LyCORIS/kohya key layout of the LoRA family (LoRA, LoCon, DoRA, LoHa, LoKr) as the UIs read it.

One module of a file is ``<kohya name>.<suffix>`` plus a 0-dim ``.alpha`` (A1111, ComfyUI, InvokeAI):

* **LoRA / LoCon**: ``lora_down.weight`` ``[r, in]`` (conv ``[r, in, kh, kw]``), ``lora_up.weight``
  ``[out, r]`` (conv ``[out, r, 1, 1]``); delta ``alpha / r * up @ down``.
* **DoRA**: LoRA plus ``dora_scale`` on the input axis, ``[1, in]`` (conv ``[1, in, 1, 1]``):
  ``W' = (W + delta) * dora_scale / ||W + delta||``, the norm over the output axis for each input
  column (A1111's and ComfyUI's reading of a ``[1, in]`` scale).
* **LoHa**: ``hada_w1_a`` ``[out, r]``, ``hada_w1_b`` ``[r, in*kh*kw]``, the same for ``hada_w2_*``;
  delta ``alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b)``. Tucker convs add ``hada_t1``/``hada_t2``
  ``[r, r, kh, kw]`` with ``w*_a`` ``[r, out]`` and ``w*_b`` ``[r, in]``.
* **LoKr**: ``lokr_w1`` ``[a, c]`` or ``lokr_w1_a`` ``[a, r]`` @ ``lokr_w1_b`` ``[r, c]``; ``lokr_w2``
  ``[b, d(, kh, kw)]`` or ``lokr_w2_a`` ``[b, r]`` @ ``lokr_w2_b`` ``[r, d*kh*kw]`` (Tucker: ``lokr_t2``);
  delta ``kron(w1, w2)`` with ``out = a*b``, ``in = c*d``, scaled by ``alpha / r`` only when a factor
  is split (r from ``lokr_w2_b``, else ``lokr_w1_b``); two full factors apply no alpha at all.

A missing alpha, or alpha 0, means alpha = r (scale 1), as kohya reads it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..errors import WeightsError
from .embeddings import bundle_tensors, bundled_embeddings, is_bundle_key
from .lora_keys import KOHYA_ALPHA, Part, kohya_name, module_resolver, split_kohya_prefix

LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight")
DORA_SCALE = "dora_scale"
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
KNOWN_SUFFIXES = frozenset((*LORA_SUFFIXES, DORA_SCALE, *LOHA_SUFFIXES, *LOKR_SUFFIXES, KOHYA_ALPHA))


@dataclass
class AdapterModule:
    """One adapted layer: ``kind`` (lora, loha, lokr), its tensors by LyCORIS suffix, and its file alpha."""

    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None

    @property
    def dora(self) -> bool:
        return DORA_SCALE in self.tensors

    def rank(self) -> int | None:
        """The ``r`` the file's alpha is divided by; None where none applies (LoKr with two full factors)."""
        t = self.tensors
        if self.kind == "lora":
            return int(t["lora_down.weight"].shape[0])
        if self.kind == "loha":
            return int(t["hada_w1_b"].shape[0])
        if "lokr_w2_b" in t:
            return int(t["lokr_w2_b"].shape[0])
        if "lokr_w1_b" in t:
            return int(t["lokr_w1_b"].shape[0])
        return None

    def scale(self) -> float:
        """``alpha / r`` as the UIs apply it (1 when alpha is missing or 0, or no r applies)."""
        rank = self.rank()
        if rank is None or not self.alpha:
            return 1.0
        return float(self.alpha) / rank


@dataclass
class AdapterFile:
    """A LoRA-family file: ``{module path: AdapterModule}`` per model, paths in PEFT/diffusers naming."""

    unet: dict[str, AdapterModule] = field(default_factory=dict)
    text_encoder: dict[str, AdapterModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    #: Embeddings bundled in the file (``bundle_emb.<word>.*``): word -> vectors ``[n, hidden]``.
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)

    def parts(self) -> Iterable[tuple[Part, str, AdapterModule]]:
        for part in ("unet", "text_encoder"):
            for path, module in getattr(self, part).items():
                yield part, path, module

    def kinds(self) -> list[str]:
        """The algorithms in the file, DoRA named apart (``lora``, ``dora``, ``loha``, ``lokr``)."""
        return sorted({"dora" if m.dora else m.kind for _, _, m in self.parts()})


def kind_of(suffixes: Iterable[str], name: str) -> str:
    """The algorithm a module's suffixes spell; mixed or incomplete sets raise naming the module."""
    found = set(suffixes) - {KOHYA_ALPHA}
    unknown = found - KNOWN_SUFFIXES
    if unknown:
        raise WeightsError(f"module {name!r}: unknown key suffix {sorted(unknown)[0]!r}; known: lora_down/up, "
                           "dora_scale, hada_*, lokr_*, alpha")
    kinds = [k for k, s in (("lora", LORA_SUFFIXES), ("loha", LOHA_SUFFIXES), ("lokr", LOKR_SUFFIXES)) if found & set(s)]
    if len(kinds) != 1:
        raise WeightsError(f"module {name!r} mixes or lacks adapter tensors: {sorted(found)}")
    kind = kinds[0]
    if DORA_SCALE in found and kind != "lora":
        raise WeightsError(f"module {name!r}: dora_scale is read by the UIs with lora_down/lora_up only, not {kind}")
    if kind == "lora" and not set(LORA_SUFFIXES) <= found:
        raise WeightsError(f"module {name!r} has {sorted(found)}; a LoRA needs lora_down.weight and lora_up.weight")
    if kind == "loha" and not {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= found:
        raise WeightsError(f"module {name!r}: a LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b")
    if kind == "lokr":
        for factor in ("lokr_w1", "lokr_w2"):
            split = {f"{factor}_a", f"{factor}_b"}
            if factor not in found and not split <= found:
                raise WeightsError(f"module {name!r}: a LoKr needs {factor} or both {factor}_a and {factor}_b")
    return kind


def check_shapes(module: AdapterModule, name: str) -> None:
    """The ranks shared between a module's factors agree (so a wrong file stops before any math)."""
    t = module.tensors

    def agree(a: str, dim_a: int, b: str, dim_b: int) -> None:
        if a in t and b in t and t[a].shape[dim_a] != t[b].shape[dim_b]:
            raise WeightsError(f"module {name!r}: {a} {tuple(t[a].shape)} and {b} {tuple(t[b].shape)} "
                               "do not share a rank")

    if module.kind == "lora":
        agree("lora_down.weight", 0, "lora_up.weight", 1)
    elif module.kind == "loha":
        tucker = "hada_t1" in t
        agree("hada_w1_a", 0 if tucker else 1, "hada_w1_b", 0)
        agree("hada_w2_a", 0 if tucker else 1, "hada_w2_b", 0)
    else:
        agree("lokr_w1_a", 1, "lokr_w1_b", 0)
        agree("lokr_w2_a", 0 if "lokr_t2" in t else 1, "lokr_w2_b", 0)


# ----------------------------------------------------------------------------- file <-> tensors


def to_kohya_tensors(adapters: AdapterFile) -> dict[str, torch.Tensor]:
    """``{"lora_unet_<module>.<suffix>": tensor}`` plus a 0-dim ``.alpha`` per module."""
    out: dict[str, torch.Tensor] = {}
    for part, path, module in adapters.parts():
        name = kohya_name(path, part)
        if f"{name}.{KOHYA_ALPHA}" in out:
            raise WeightsError(f"two {part} modules map to kohya name {name!r}")
        for suffix, tensor in module.tensors.items():
            out[f"{name}.{suffix}"] = tensor
        alpha = module.alpha if module.alpha is not None else float(module.rank() or 1)
        out[f"{name}.{KOHYA_ALPHA}"] = torch.tensor(float(alpha))
    if not out:
        raise WeightsError("the adapter file has no modules")
    for word, vectors in adapters.embeddings.items():
        out.update(bundle_tensors(word, vectors, dtype=vectors.dtype))
    return out


def from_kohya_tensors(
    tensors: Mapping[str, torch.Tensor],
    unet_module_names: Iterable[str] | None = None,
    text_encoder_module_names: Iterable[str] | None = None,
) -> AdapterFile:
    """kohya/LyCORIS tensors -> :class:`AdapterFile`, module paths recovered as in ``kohya_to_peft``."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if is_bundle_key(key):
            continue
        lora_name, _, suffix = key.partition(".")
        groups.setdefault(lora_name, {})[suffix] = tensor
    resolvers = {"unet": module_resolver(unet_module_names, "unet"),
                 "text_encoder": module_resolver(text_encoder_module_names, "text_encoder")}
    result = AdapterFile()
    for lora_name, parts in sorted(groups.items()):
        kind = kind_of(parts, lora_name)
        part, flat = split_kohya_prefix(lora_name)
        path = resolvers[part](flat, lora_name)
        alpha = parts.get(KOHYA_ALPHA)
        module = AdapterModule(kind, {s: t for s, t in parts.items() if s != KOHYA_ALPHA},
                               float(alpha.item()) if alpha is not None else None)
        check_shapes(module, lora_name)
        target = getattr(result, part)
        if path in target:
            raise WeightsError(f"kohya module {lora_name!r} resolves to {path!r}, which another key already uses")
        target[path] = module
    if not result.unet and not result.text_encoder:
        raise WeightsError("the adapter file holds no tensors")
    result.embeddings = bundled_embeddings(tensors)
    return result


def is_lycoris(keys: Iterable[str]) -> bool:
    """Whether kohya-layout keys hold anything beyond plain LoRA (LoHa, LoKr or DoRA tensors)."""
    return any(k.partition(".")[2] in KNOWN_SUFFIXES - {*LORA_SUFFIXES, KOHYA_ALPHA} for k in keys)


# ----------------------------------------------------------------------------- metadata


def network_metadata(algo: str, conv_rank: int | None, conv_alpha: float | None,
                     extra_args: Mapping[str, object] | None = None) -> dict[str, str | None]:
    """``ss_network_module`` / ``ss_network_args`` as kohya (plain LoRA/LoCon) or LyCORIS (the rest) write them."""
    args: dict[str, str] = {}
    if algo == "lora":
        module = "networks.lora"
    else:
        module = "lycoris.kohya"
        args["algo"] = "lora" if algo == "dora" else algo
        if algo == "dora":
            args["dora_wd"] = "True"
            args["wd_on_out"] = "False"
    if conv_rank is not None:
        args["conv_dim"] = str(int(conv_rank))
        args["conv_alpha"] = str(float(conv_alpha if conv_alpha is not None else conv_rank))
    args.update({k: str(v) for k, v in (extra_args or {}).items()})
    return {"ss_network_module": module, "ss_network_args": json.dumps(args) if args else None}


def lora_peft_state(modules: Mapping[str, AdapterModule]) -> dict[str, torch.Tensor]:
    """Plain-LoRA modules as a PEFT state dict with each file scale folded into ``lora_B`` (so alpha = rank)."""
    out: dict[str, torch.Tensor] = {}
    for path, module in modules.items():
        if module.kind != "lora" or module.dora:
            raise WeightsError(f"module {path!r} is {'DoRA' if module.dora else module.kind}; only plain LoRA has a "
                               "PEFT/diffusers spelling that diffusers applies as the UIs do")
        out[f"{path}.lora_A.weight"] = module.tensors["lora_down.weight"]
        out[f"{path}.lora_B.weight"] = module.tensors["lora_up.weight"] * module.scale()
    return out
