"""How a run ends: its result (where the files went), or the divergence that stops it without an export."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DreamtuneError


class TrainingDiverged(DreamtuneError, RuntimeError):
    """The loss became NaN/inf; nothing is exported from a diverged run."""

    exit_code = 1


def diverged_message(what: str, step: int, checkpoints_dir: Path) -> str:
    """Why a run stopped without an export, where its last good checkpoint is, and what to try."""
    return (
        f"{what} at step {step}; nothing was exported. The last good checkpoint is kept in {checkpoints_dir}. "
        "Try a lower train.learning_rate, train.mixed_precision=bf16 or no, or model.vae_dtype=fp32 (the VAE in "
        "full precision)."
    )


def stop_if_diverged(loss: float, step: int, checkpoints_dir: Path) -> None:
    """Raise TrainingDiverged when a step's loss is NaN/inf (every process sees the same, all-reduced, loss)."""
    if not math.isfinite(loss):
        raise TrainingDiverged(diverged_message(f"loss became {loss}", step, checkpoints_dir))


@dataclass
class RunResult:
    """Where a finished (or interrupted) run left its files."""

    output_dir: Path
    global_step: int
    exported: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    interrupted: bool = False
    last_loss: float = float("nan")
    ui_file: Path | None = None  # the exported file to give a UI
    validation_losses: dict[int, float] = field(default_factory=dict)  # step -> held-out loss
