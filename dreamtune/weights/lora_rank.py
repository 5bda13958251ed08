"""LoRAs by SVD: extract one from a fine-tune against its base, or re-rank (resize) an existing one.

Each module's weight change ``delta`` (``[out, in]``, or ``[out, in, kh, kw]`` for a conv, seen as
``[out, in*kh*kw]``) is factored as ``U S Vh``; rank ``r`` keeps ``up = U[:, :r] S[:r]`` and
``down = Vh[:r]`` with alpha = r (scale 1), kohya's layout (a conv's down is a ``kh x kw`` conv, its up
a 1x1 conv). The *kept energy* ``sum(S[:r]^2) / sum(S^2)`` says how much of the change survives.
Tensors are read one at a time, so memory stays at a few modules, as in ``blend``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import WeightsError
from .ldm_keys import TEXT_MODEL_PREFIX, UNET_PREFIX, KeyMap
from .lora_formats import LoraFile
from .lora_keys import KOHYA_ALPHA, KOHYA_DOWN, KOHYA_UP, Part, kohya_name
from .merge import lora_delta
from .sources import TensorSource

#: Text-encoder layers a kohya LoRA can hold (the UIs patch only these): attention and MLP projections.
TEXT_ENCODER_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True)
class RankChoice:
    """A fixed rank, or the smallest rank that keeps ``energy`` of each module's change, capped at ``max_rank``."""

    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None

    def __post_init__(self):
        if (self.rank is None) == (self.energy is None):
            raise WeightsError("give a fixed rank (--rank) or a kept-energy fraction (--energy), not both or neither")
        if self.rank is not None and self.rank < 1:
            raise WeightsError(f"--rank must be at least 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise WeightsError(f"--energy must be in (0, 1], got {self.energy}")

    def pick(self, squared: torch.Tensor) -> int:
        """The rank to keep for singular values whose squares are ``squared`` (descending)."""
        if self.rank is not None:
            rank = self.rank
        else:
            cumulative = torch.cumsum(squared, 0) / squared.sum()
            rank = int(torch.searchsorted(cumulative, torch.tensor(self.energy, dtype=cumulative.dtype))) + 1
        return max(1, min(rank, squared.numel(), self.max_rank or rank))


@dataclass(frozen=True)
class ModuleReport:
    part: Part
    module: str
    rank: int
    full_rank: int
    energy: float  # fraction of the squared singular values kept


def factor(delta: torch.Tensor, choice: RankChoice) -> tuple[torch.Tensor, torch.Tensor, int, int, float]:
    """``(down, up, rank, full_rank, kept_energy)`` of one module's change; the SVD runs in fp64, so a
    full-rank factorisation reproduces the change to fp32 rounding."""
    matrix = delta.double().flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    squared = s ** 2
    rank = choice.pick(squared)
    kept = float(squared[:rank].sum() / squared.sum())
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    if delta.ndim == 4:
        down = down.reshape(rank, *delta.shape[1:])
        up = up.reshape(*up.shape, 1, 1)
    return down.float().contiguous(), up.float().contiguous(), rank, int(s.numel()), kept


def _write(out: dict[str, torch.Tensor], part: Part, module: str, down: torch.Tensor, up: torch.Tensor,
           dtype: torch.dtype) -> None:
    name = kohya_name(module, part)
    out[f"{name}.{KOHYA_DOWN}"] = down.to(dtype)
    out[f"{name}.{KOHYA_UP}"] = up.to(dtype)
    out[f"{name}.{KOHYA_ALPHA}"] = torch.tensor(float(down.shape[0]))


def _changed_modules(base: TensorSource, tuned: TensorSource, unet_map: KeyMap, text_encoder: bool,
                     min_change: float) -> Iterator[tuple[Part, str, torch.Tensor]]:
    """``(part, module, delta)`` for each LoRA-able weight that changed by more than ``min_change``."""
    for key in base.keys:
        if key.startswith(UNET_PREFIX):
            diffusers_key = unet_map.to_diffusers.get(key)
            if diffusers_key is None or not diffusers_key.endswith(".weight") or len(base.shape(key)) not in (2, 4):
                continue
            part, module = "unet", diffusers_key.removesuffix(".weight")
        elif text_encoder and key.startswith(TEXT_MODEL_PREFIX) and key.endswith(".weight"):
            module = key[len(TEXT_MODEL_PREFIX):].removesuffix(".weight")
            if module.rsplit(".", 1)[-1] not in TEXT_ENCODER_LINEARS:
                continue
            part = "text_encoder"
        else:
            continue
        if key not in tuned:
            raise WeightsError(f"{tuned.name} has no {key!r}: is it a fine-tune of {base.name}?")
        if tuned.shape(key) != base.shape(key):
            raise WeightsError(f"{key}: {tuned.name} has shape {tuned.shape(key)}, {base.name} {base.shape(key)}; "
                               "extract-lora needs a fine-tune of the same architecture")
        delta = tuned.get(key).float() - base.get(key).float()
        if delta.abs().max() > min_change:
            yield part, module, delta


def unrepresentable_changes(base: TensorSource, tuned: TensorSource, represented: set[str], text_encoder: bool,
                            min_change: float) -> list[str]:
    """Keys that changed but no LoRA module holds (biases, norms, embeddings, the VAE)."""
    found = []
    for key in base.keys:
        if key in represented or key not in tuned or (not text_encoder and key.startswith(TEXT_MODEL_PREFIX)):
            continue
        if (tuned.get(key).float() - base.get(key).float()).abs().max() > min_change:
            found.append(key)
    return found


def extract_lora(base: TensorSource, tuned: TensorSource, unet_map: KeyMap, choice: RankChoice, *,
                 text_encoder: bool = False, min_change: float = 1e-6,
                 dtype: torch.dtype = torch.float16) -> tuple[dict[str, torch.Tensor], list[ModuleReport], list[str]]:
    """kohya LoRA tensors approximating ``tuned - base``, a report per module, and the changed keys it cannot hold."""
    out: dict[str, torch.Tensor] = {}
    reports: list[ModuleReport] = []
    represented: set[str] = set()
    for part, module, delta in _changed_modules(base, tuned, unet_map, text_encoder, min_change):
        down, up, rank, full, kept = factor(delta, choice)
        _write(out, part, module, down, up, dtype)
        reports.append(ModuleReport(part, module, rank, full, kept))
        represented.add(unet_map.to_single[module + ".weight"] if part == "unet"
                        else f"{TEXT_MODEL_PREFIX}{module}.weight")
    if not out:
        raise WeightsError(f"{tuned.name} does not differ from {base.name} in any LoRA-able layer "
                           f"(by more than {min_change}); nothing to extract")
    return out, reports, unrepresentable_changes(base, tuned, represented, text_encoder, min_change)


def resize_lora(lora: LoraFile, choice: RankChoice,
                dtype: torch.dtype = torch.float16) -> tuple[dict[str, torch.Tensor], list[ModuleReport]]:
    """The LoRA re-factored at the chosen rank (alpha = rank), as kohya tensors, with a report per module."""
    out: dict[str, torch.Tensor] = {}
    reports: list[ModuleReport] = []
    for part in ("unet", "text_encoder"):
        for module, (down, up) in lora.modules(part).items():
            shape = (up.shape[0], *down.shape[1:])
            delta = lora_delta(down, up, shape, module) * lora.scale(module)
            new_down, new_up, rank, _, kept = factor(delta, choice)
            _write(out, part, module, new_down, new_up, dtype)
            reports.append(ModuleReport(part, module, rank, int(down.shape[0]), kept))
    if not out:
        raise WeightsError("the LoRA holds no modules to resize")
    return out, reports


def summary(reports: list[ModuleReport]) -> str:
    """One line: modules, ranks kept, and the kept energy (min, mean)."""
    ranks = sorted({r.rank for r in reports})
    energies = [r.energy for r in reports]
    shown = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    return (f"{len(reports)} modules, rank {shown}, kept energy min {min(energies):.4f} "
            f"mean {sum(energies) / len(energies):.4f}")
