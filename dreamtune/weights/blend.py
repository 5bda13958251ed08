"""Weighted blends of checkpoints, add-difference, averages of trained-tensor files, streamed key by key.

Every blend is a linear combination ``sum_i c_i * input_i`` over the keys it mixes (the UNet,
and the text encoder unless ``unet_only``); every other key (the VAE) comes from the first input.
Tensors are read one at a time (:class:`~dreamtune.weights.sources.TensorSource`), accumulated in
fp32 and cast to the output dtype, so memory holds the output plus a few tensors, never a second
input model. A coefficient of exactly 0 skips that input's tensor, so alpha 0 and 1 reproduce an
input bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from ..errors import WeightsError
from .ldm_keys import component_of
from .sources import TensorSource, cast_floating

KeyFilter = Callable[[str], bool]


class BlendError(WeightsError):
    """Inputs that cannot be blended (a key missing from one, or shapes that differ)."""


def mixed_keys_filter(unet_only: bool) -> KeyFilter:
    """Which canonical keys a checkpoint blend mixes: the UNet, plus the text encoder unless ``unet_only``."""
    parts = ("unet",) if unet_only else ("unet", "text_encoder")
    return lambda key: component_of(key) in parts


def mix_all(key: str) -> bool:
    """Mix every key (run-checkpoint averaging, where files hold only trained tensors)."""
    return True


def _require_finite(name: str, values: Sequence[float]) -> None:
    """NaN or inf coefficients would write a model of NaN tensors; refuse them by name."""
    bad = [v for v in values if not math.isfinite(float(v))]
    if bad:
        raise BlendError(f"{name} must be finite numbers, got {bad[0]}; pass a number such as 0.5")


def average_weights(weights: Sequence[float] | None, alpha: float | None, count: int) -> list[float]:
    """Normalized weights from ``--weights`` or ``--alpha`` (A*first + (1-A)*second); default equal."""
    _require_finite("--alpha", [] if alpha is None else [alpha])
    _require_finite("--weights", weights or [])
    if weights is not None and alpha is not None:
        raise BlendError("give either weights or alpha, not both")
    if alpha is not None:
        if count != 2:
            raise BlendError(f"alpha blends exactly two inputs; {count} were given (use weights)")
        return [float(alpha), 1.0 - float(alpha)]
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise BlendError(f"{len(weights)} weights for {count} inputs; give one weight per input")
    total = float(sum(weights))
    if math.isclose(total, 0.0, abs_tol=1e-12):
        raise BlendError(f"weights {list(weights)} sum to 0; a weighted average needs a nonzero sum")
    return [float(w) / total for w in weights]


def add_difference_coefficients(multiplier: float) -> list[float]:
    """``A + m * (B - C)`` as coefficients of (A, B, C)."""
    _require_finite("--multiplier", [multiplier])
    return [1.0, float(multiplier), -float(multiplier)]


def check_compatible(sources: Sequence[TensorSource], mixed: KeyFilter) -> None:
    """Every mixed key is in every input with one shape; raise naming the key, inputs and both shapes."""
    first = sources[0]
    wanted = [k for k in first.keys if mixed(k)]
    if not wanted:
        raise BlendError(f"{first.name} has no tensors to blend")
    for other in sources[1:]:
        for key in wanted:
            if key not in other:
                raise BlendError(f"key {key!r} is in {first.name} {first.shape(key)} but missing from {other.name}")
            if first.shape(key) != other.shape(key):
                raise BlendError(
                    f"shape mismatch for key {key!r}: {first.name} has {first.shape(key)}, "
                    f"{other.name} has {other.shape(key)}"
                )
        extra = [k for k in other.keys if mixed(k) and k not in first]
        if extra:
            raise BlendError(f"key {extra[0]!r} is in {other.name} {other.shape(extra[0])} but missing from {first.name}")


def combine_tensor(sources: Sequence[TensorSource], coefficients: Sequence[float], key: str) -> torch.Tensor:
    """``sum c_i * t_i`` for one key in fp32, reading only inputs with a nonzero coefficient."""
    acc: torch.Tensor | None = None
    for source, coefficient in zip(sources, coefficients):
        if coefficient == 0.0:
            continue
        tensor = source.get(key).to(torch.float32, copy=True)
        acc = tensor.mul_(coefficient) if acc is None else acc.add_(tensor, alpha=coefficient)
        del tensor
    return acc if acc is not None else torch.zeros(sources[0].shape(key), dtype=torch.float32)


def combine(
    sources: Sequence[TensorSource],
    coefficients: Sequence[float],
    mixed: KeyFilter,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The linear combination of ``sources`` over mixed keys; other keys from the first input."""
    if len(sources) != len(coefficients):
        raise BlendError(f"{len(coefficients)} coefficients for {len(sources)} inputs")
    check_compatible(sources, mixed)
    first, out = sources[0], {}
    for key in first.keys:
        stored = first.dtype(key)
        if mixed(key) and stored.is_floating_point:
            out[key] = combine_tensor(sources, coefficients, key).to(dtype if dtype is not None else stored)
        else:
            out[key] = cast_floating(first.get(key), dtype)
    return out


def sweep_states(
    sources: Sequence[TensorSource],
    values: Sequence[float],
    coefficients_for: Callable[[float], Sequence[float]],
    mixed: KeyFilter,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[float, dict[str, torch.Tensor]]]:
    """Yield ``(value, blended state)`` one at a time, so a sweep holds one blended model at once."""
    check_compatible(sources, mixed)
    for value in values:
        yield value, combine(sources, coefficients_for(value), mixed, dtype)


def blend_with_base(
    finetuned_state: Mapping[str, torch.Tensor], base_state: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``alpha * finetuned + (1 - alpha) * base`` per key of ``finetuned_state`` (in its dtype).

    For a trainer's export (e.g. DreamBooth ``export.blend_alpha``): every fine-tuned key must be
    in the base with the same shape; alpha 1 returns the fine-tuned tensors, alpha 0 the base's.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tuned in finetuned_state.items():
        if key not in base_state:
            raise BlendError(f"key {key!r} of the fine-tuned state is missing from the base state")
        base = base_state[key]
        if tuple(base.shape) != tuple(tuned.shape):
            raise BlendError(
                f"shape mismatch for key {key!r}: fine-tuned has {tuple(tuned.shape)}, base has {tuple(base.shape)}"
            )
        if not tuned.is_floating_point() or alpha == 1.0:
            out[key] = tuned.detach().clone()
        elif alpha == 0.0:
            out[key] = base.detach().to(device=tuned.device, dtype=tuned.dtype).clone()
        else:
            mixed = tuned.detach().float() * alpha + base.detach().to(tuned.device).float() * (1.0 - alpha)
            out[key] = mixed.to(tuned.dtype)
    return out
