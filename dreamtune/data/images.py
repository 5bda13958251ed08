"""Open any image as RGB and shape it into a training tensor, with PIL and numpy only."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class BadImageError(ValueError):
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


def resize_and_crop(image: Image.Image, size: int, center: bool, rng: random.Random) -> Image.Image:
    """Resize the short side to ``size`` (Lanczos) and crop a ``size`` square, centered or at random."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if center:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    else:
        left, top = rng.randint(0, new_w - size), rng.randint(0, new_h - size)
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [-1, 1], the range the VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def prepare_image(
    image: Image.Image, size: int, center_crop: bool, flip: bool, rng: random.Random
) -> torch.Tensor:
    """The whole image transform: RGB, resize, crop, optional flip, tensor."""
    image = resize_and_crop(to_rgb(image), size, center_crop, rng)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)
