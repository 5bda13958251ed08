"""Trainer name -> method class, imported lazily so `trainer: lora` never imports DreamBooth."""

from __future__ import annotations

import importlib

from .config import TRAINERS, RunConfig
from .method import TrainingMethod

_METHODS = {
    "dreambooth": "dreamtune.trainers.dreambooth:DreamBoothMethod",
    "lora": "dreamtune.trainers.lora:LoraMethod",
    "textual_inversion": "dreamtune.trainers.textual_inversion:TextualInversionMethod",
}


def create_method(cfg: RunConfig) -> TrainingMethod:
    """The method object for ``cfg.trainer``; an unknown name lists the valid ones."""
    if cfg.trainer not in _METHODS:
        available = ", ".join(sorted(_METHODS))
        known = " (it is planned but not available in this version)" if cfg.trainer in TRAINERS else ""
        raise ValueError(f"trainer: {cfg.trainer!r} cannot run{known}; available: {available}")
    module_name, class_name = _METHODS[cfg.trainer].split(":")
    return getattr(importlib.import_module(module_name), class_name)(cfg)
