"""Helpers every subcommand shares: error exits and loading a pipeline from any model reference."""

from __future__ import annotations

import sys
from pathlib import Path


def fail(message: str, code: int = 2) -> int:
    """Print ``error: message`` to stderr and return the exit code (no traceback for user errors)."""
    print(f"error: {message}", file=sys.stderr)
    return code


def load_pipeline(model: str, allow_pickle: bool = False):
    """A StableDiffusionPipeline from a diffusers folder, a hub id or a single-file checkpoint."""
    from diffusers import StableDiffusionPipeline

    if Path(model).is_file():
        from ..weights.single_file import load_single_file_pipeline

        return load_single_file_pipeline(model, allow_pickle=allow_pickle)
    return StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
