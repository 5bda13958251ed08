"""Open any image as RGB and shape it into a training tensor, with PIL and numpy only."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class BadImageError(DataError):
    """An image file that cannot be decoded; the message names the file."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode to RGB; transparency is composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        return Image.fromarray((array / peak * 255.0).clip(0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` fully as RGB, or raise BadImageError naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"{path}: not a readable image ({err})") from err


@dataclass(frozen=True)
class Transform:
    """Resize to ``resized`` (w, h), crop ``box`` (left, top, right, bottom), then flip or not."""

    resized: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool = False

    def key(self) -> str:
        """A stable text form, for cache keys."""
        return f"{self.resized[0]}x{self.resized[1]}:{','.join(map(str, self.box))}:{int(self.flip)}"


def plan_transform(
    size: tuple[int, int], target: tuple[int, int], center: bool, flip: bool, rng: random.Random
) -> Transform:
    """Scale ``size`` to cover ``target`` (w, h) and choose the crop, centered or at random."""
    width, height = size
    tw, th = target
    scale = max(tw / width, th / height)
    new_w, new_h = max(tw, round(width * scale)), max(th, round(height * scale))
    if center:
        left, top = (new_w - tw) // 2, (new_h - th) // 2
    else:
        left, top = rng.randint(0, new_w - tw), rng.randint(0, new_h - th)
    return Transform((new_w, new_h), (left, top, left + tw, top + th), flip)


def apply_transform(image: Image.Image, transform: Transform) -> Image.Image:
    """Resize (Lanczos), crop and maybe flip an RGB image as ``transform`` says."""
    if image.size != transform.resized:
        image = image.resize(transform.resized, Image.Resampling.LANCZOS)
    image = image.crop(transform.box)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if transform.flip else image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [-1, 1], the range the VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())
