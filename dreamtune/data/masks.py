"""Loss masks for data.masked_loss: each image's alpha channel, or a same-name image in data.mask_dir.

A mask is a single-channel image the size of its image (white = learn here, black = background). It goes
through the same resize, crop and flip as its image, and reaches the objective as a [1, H, W] tensor in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..errors import DataError
from .images import IMAGE_EXTENSIONS


class MaskError(DataError):
    """Masked loss is on but an image has no mask; the message names the images and where masks were looked for."""


def has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` carries transparency (an alpha channel or a transparent palette colour)."""
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


@dataclass(frozen=True)
class MaskLoader:
    """A picklable loader of one image's mask: the alpha of ``path`` (``alpha``) or the mask file ``path``."""

    path: Path
    alpha: bool
    size: tuple[int, int]

    def __call__(self) -> Image.Image:
        with Image.open(self.path) as image:
            image = ImageOps.exif_transpose(image)
            if self.alpha:
                mask = image.convert("RGBA").getchannel("A")
            else:
                mask = (image if image.mode in ("L", "RGB") else image.convert("RGB")).getchannel(0)
        return mask if mask.size == self.size else mask.resize(self.size, Image.Resampling.BILINEAR)

    def identity(self) -> str:
        """What names this mask's content for the latent cache."""
        stat = self.path.stat()
        return f"mask:{int(self.alpha)}:{self.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def find_mask(image_path: Path, root: Path, mask_dir: Path) -> Path | None:
    """The file in ``mask_dir`` at ``image_path``'s place relative to ``root``, with any image extension."""
    stem = mask_dir / image_path.relative_to(root).with_suffix("")
    same = stem.with_suffix(image_path.suffix)
    if same.is_file():
        return same
    return next((p for p in sorted(stem.parent.glob(f"{stem.name}.*"))
                 if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()), None)


def attach_masks(records: list, root: Path, mask_dir: str | None, key: str = "data") -> None:
    """Give each folder record its mask loader, or raise MaskError naming every image without one.

    A missing mask is an error, never a full mask: a forgotten file would silently train the background.
    """
    missing = []
    for record in records:
        path = Path(record.origin)
        if mask_dir:
            found = find_mask(path, root, Path(mask_dir))
            if found is None:
                missing.append(str(path))
            else:
                record.mask = MaskLoader(found, False, record.size)
            continue
        with Image.open(path) as image:
            alpha = has_alpha(image)
        if alpha:
            record.mask = MaskLoader(path, True, record.size)
        else:
            missing.append(str(path))
    if not missing:
        return
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    if mask_dir:
        raise MaskError(f"data.masked_loss: no mask in data.mask_dir {mask_dir} for {len(missing)} image(s) of "
                        f"{key}.instance_dir {root}: {shown}. Add a same-name mask image there (white = subject) "
                        "or set data.masked_loss=false")
    raise MaskError(f"data.masked_loss: {len(missing)} image(s) of {key}.instance_dir {root} have no alpha channel: "
                    f"{shown}. Save them with transparency around the subject, set data.mask_dir to a folder of "
                    "masks, or set data.masked_loss=false")


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """A single-channel mask image -> float tensor [1, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None]


def downsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A [1, H, W] mask area-averaged to ``size`` (the latent's h, w), as the objective would do it."""
    return F.interpolate(mask[None].float(), size=tuple(size), mode="area")[0]
