"""Helpers the data tests share: small images written with PIL into tmp folders."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from dreamtune.data.config import DataConfig


def write_image(path: Path, size: tuple[int, int] = (64, 48), color=(200, 100, 50), caption: str | None = None,
                ext: str = ".txt") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    if caption is not None:
        path.with_suffix(ext).write_text(caption, encoding="utf-8")
    return path


def cfg(**keys) -> DataConfig:
    return DataConfig(**{"resolution": 32, **keys})
