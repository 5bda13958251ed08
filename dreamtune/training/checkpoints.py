"""Resumable training state: written atomically, rotated, found again on resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..errors import DreamtuneError
from .ownership import checkpoint_fingerprint, own_checkpoints
from .run_folder import STATE_FILE, checkpoint_name, list_checkpoints  # noqa: F401  (this module's vocabulary)


class CheckpointNotFound(DreamtuneError, FileNotFoundError):
    """train.resume names a folder that is not a complete checkpoint of this method."""


class ForeignCheckpoint(DreamtuneError):
    """train.resume names a checkpoint another run (another config) wrote."""


def resolve_resume(resume: str | None, checkpoints_dir: Path, fingerprint: str | None = None) -> Path | None:
    """``auto`` -> this run's latest complete checkpoint (or None: a fresh start); a path must be a checkpoint
    of this run (same ``fingerprint``; checkpoints from before fingerprints are accepted)."""
    if resume is None:
        return None
    if resume == "auto":
        found = own_checkpoints(checkpoints_dir, fingerprint) if fingerprint else list_checkpoints(checkpoints_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointNotFound(
            f"train.resume: {path} is not a complete checkpoint (no {STATE_FILE}); "
            f"use 'auto' or a folder under {checkpoints_dir}"
        )
    if fingerprint and checkpoint_fingerprint(path) not in (fingerprint, None):
        raise ForeignCheckpoint(
            f"train.resume: {path} was written by another run (its config differs in what changes the weights: "
            "model, data, train or the method section); resume it with the config it was trained with, or start "
            "this run without train.resume"
        )
    return path


class InsufficientDiskError(DreamtuneError, OSError):
    """Not enough free disk for a checkpoint; raised before anything is written."""


def check_free_disk(folder: Path, needed: int) -> None:
    """Fail with the sizes when ``folder``'s disk cannot hold ``needed`` bytes."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise InsufficientDiskError(
            f"not enough free disk to write a checkpoint in {folder}: needs about {needed / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB free. Free space, lower train.checkpoints_total_limit, or move output.dir."
        )


def rotate(checkpoints_dir: Path, keep: int | None, fingerprint: str | None = None, keep_best: int = 0) -> None:
    """Delete this run's (``fingerprint``'s) oldest complete checkpoints beyond ``keep`` (sparing the ``keep_best``
    with the lowest held-out loss), and stale half-written ones; another run's checkpoints are never touched."""
    for stale in checkpoints_dir.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep is None:
        return
    found = own_checkpoints(checkpoints_dir, fingerprint) if fingerprint else list_checkpoints(checkpoints_dir)
    best: set[Path] = set()
    if keep_best:
        losses = {p: read_state(p).get("val_loss") for p in found}
        best = set(sorted((p for p, loss in losses.items() if loss is not None), key=losses.get)[:keep_best])
    for old in found[:-keep]:
        if old not in best:
            shutil.rmtree(old, ignore_errors=True)


def save_trainable(tensors: dict[str, dict], folder: Path) -> None:
    """Only the trained tensors of each module (an adapter's checkpoint stays megabytes, not gigabytes)."""
    for name, state in tensors.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, folder / f"trainable_{name}.safetensors")


def copy_into_parameters(name: str, module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy tensors into ``module``'s parameters by name; every saved tensor must find its parameter."""
    params = dict(module.named_parameters())
    unknown = [k for k in saved if k not in params]
    if unknown:
        raise KeyError(f"tensors {unknown[:3]} match no parameter of {name}")
    with torch.no_grad():
        for key, value in saved.items():
            params[key].copy_(value.to(params[key].dtype))


LoadState = Callable[[str, torch.nn.Module, dict[str, torch.Tensor]], None]


def load_trainable(
    modules: dict[str, torch.nn.Module], folder: Path, load_state: LoadState = copy_into_parameters
) -> None:
    """Hand each module's checkpointed tensors to ``load_state`` (the method's hook) to put back."""
    for name, module in modules.items():
        path = folder / f"trainable_{name}.safetensors"
        if not path.is_file():
            raise CheckpointNotFound(f"checkpoint {folder} has no {path.name}; was it written by another trainer?")
        try:
            load_state(name, module, load_file(str(path)))
        except KeyError as err:
            raise KeyError(f"checkpoint {path}: {err.args[0]}") from err


def write_state(folder: Path, state: dict) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def read_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())
