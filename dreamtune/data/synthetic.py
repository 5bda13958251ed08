"""Procedural example images: a small, seedable concept the tests train on."""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

BACKGROUNDS = [(235, 235, 225), (200, 225, 245), (215, 240, 205), (245, 220, 225), (230, 230, 245)]


def star_points(cx: float, cy: float, outer: float, inner: float, points: int = 5, turn: float = 0.0):
    """Vertices of a star polygon centred at (cx, cy)."""
    out = []
    for i in range(points * 2):
        radius = outer if i % 2 == 0 else inner
        angle = turn + math.pi * i / points - math.pi / 2
        out.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return out


def draw_concept(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """The 'sks toy': a yellow five-point star with a dark outline and a red dot, placed at random."""
    width, height = size
    image = Image.new("RGB", size, rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    outer = short * rng.uniform(0.28, 0.4)
    cx = rng.uniform(outer, width - outer)
    cy = rng.uniform(outer, height - outer)
    draw.polygon(star_points(cx, cy, outer, outer * 0.45, turn=rng.uniform(-0.2, 0.2)),
                 fill=(250, 200, 30), outline=(40, 30, 20), width=max(1, short // 40))
    dot = outer * 0.18
    draw.ellipse((cx - dot, cy - dot, cx + dot, cy + dot), fill=(210, 40, 40))
    return image


def write_concept_folder(folder: str | Path, count: int, seed: int, caption: str | None) -> list[Path]:
    """Write ``count`` concept images (mixed sizes and aspect ratios), with .txt captions if given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes = [(128, 128), (160, 128), (128, 160), (144, 144)]
    paths = []
    for i in range(count):
        path = folder / f"sks_{i:02d}.png"
        draw_concept(sizes[i % len(sizes)], rng).save(path, optimize=True)
        if caption:
            path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        paths.append(path)
    return paths
