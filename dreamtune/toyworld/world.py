"""The toy world: flat shapes in named colours, sizes and positions, rendered with captions.

It is small enough for a Stable Diffusion 1.x-architecture model to learn from scratch on a CPU,
and exact enough that a classifier can say whether a generated image shows what was asked.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 32
SUPERSAMPLE = 4

BASE_SHAPES = ("circle", "square", "triangle", "diamond", "cross")
#: Shapes the base model never sees; the benchmark teaches one of them under a rare token. A heart,
#: because its lobes and tip survive the base's VAE, as SD's VAE keeps a subject it was never
#: captioned with; thin features (a star's 2-3 px points) come back as a blob (docs/benchmarks.md).
NEW_SHAPES = ("heart",)
ALL_SHAPES = BASE_SHAPES + NEW_SHAPES

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (15, 15, 15)}
SIZES = {"small": 0.32, "large": 0.5}  # shape extent as a share of the image side
POSITIONS = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
@dataclass(frozen=True)
class Scene:
    """One image of the world: what is drawn, how big, where, on what."""

    shape: str
    color: str
    size: str = "large"
    position: str = "center"
    background: str = "white"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of half-extent ``r`` centred at (cx, cy)."""
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        a, b = r, r * 0.34
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b),
                (cx + a, cy + b), (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a),
                (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b)]
    if shape == "heart":
        return _heart(cx, cy, r)
    raise ValueError(f"unknown toy-world shape {shape!r}; known: {', '.join(ALL_SHAPES)}")


def _heart(cx: float, cy: float, r: float, points: int = 48) -> list[tuple[float, float]]:
    """The classic parametric heart (two lobes up, tip down), scaled to fill a box of half-side ``r``."""
    t = [2 * math.pi * i / points for i in range(points)]
    xs = [16 * math.sin(a) ** 3 for a in t]
    ys = [-(13 * math.cos(a) - 5 * math.cos(2 * a) - 2 * math.cos(3 * a) - math.cos(4 * a)) for a in t]
    mid_y = (max(ys) + min(ys)) / 2
    scale = r / max(max(abs(x) for x in xs), (max(ys) - min(ys)) / 2)
    return [(cx + x * scale, cy + (y - mid_y) * scale) for x, y in zip(xs, ys)]


def render(scene: Scene, resolution: int = RESOLUTION, jitter: random.Random | None = None,
           extent: float | None = None) -> Image.Image:
    """Draw ``scene`` (anti-aliased); ``jitter`` moves and scales the shape slightly.

    ``extent`` (a share of the image side) replaces the scene's size: the classifier's specks.
    """
    big = resolution * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[scene.position]
    r = (SIZES[scene.size] if extent is None else extent) * big / 2
    if jitter is not None:
        fx += jitter.uniform(-0.04, 0.04)
        fy += jitter.uniform(-0.04, 0.04)
        r *= jitter.uniform(0.9, 1.1)
    cx, cy = fx * big, fy * big
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r), fill=fill)
    return image.resize((resolution, resolution), Image.Resampling.BOX)


def all_scenes(shapes=BASE_SHAPES) -> list[Scene]:
    """Every combination of shape, colour, size, position and background, in a fixed order."""
    return [Scene(*combo) for combo in itertools.product(shapes, COLORS, SIZES, POSITIONS, BACKGROUNDS)]


def held_out_scenes(share: float = 0.1, seed: int = 1234) -> frozenset[Scene]:
    """A fixed ``share`` of the base world's combinations that pretraining never renders.

    Their captions are the base model's quality check: it must compose shape, colour, size,
    position and background into an image it never saw.
    """
    scenes = all_scenes()
    random.Random(seed).shuffle(scenes)
    return frozenset(scenes[: round(share * len(scenes))])


HELD_OUT = held_out_scenes()


def random_scene(rng: random.Random, shapes=BASE_SHAPES, held_out: frozenset[Scene] = HELD_OUT) -> Scene:
    """A uniformly drawn scene, never one of the held-out combinations."""
    while True:
        scene = Scene(
            shape=rng.choice(shapes),
            color=rng.choice(list(COLORS)),
            size=rng.choice(list(SIZES)),
            position=rng.choice(list(POSITIONS)),
            background=rng.choice(list(BACKGROUNDS)),
        )
        if scene not in held_out:
            return scene


def caption(scene: Scene, rng: random.Random, noun: str | None = None, position_rate: float = 0.6,
            color_rate: float = 1.0) -> str:
    """A caption naming the shape, and at random the colour, size, background and position.

    Several phrasings ("a red circle", "a circle in red", "a photo of ...", "..., top left") so the
    model learns each modifier as a phrase it can apply to a new noun later. ``noun`` replaces the
    shape word (the benchmark's rare token); ``position_rate`` and ``color_rate`` are the shares of
    captions naming the position and the colour.
    """
    noun = noun or scene.shape
    size = f"{scene.size} " if rng.random() < 0.4 else ""
    if color_rate < 1.0 and rng.random() >= color_rate:  # drawn only when needed: the default stream is unchanged
        text = f"a {size}{noun}"
    elif rng.random() < 0.5:
        text = f"a {size}{scene.color} {noun}"
    else:
        text = f"a {size}{noun} in {scene.color}"
    if rng.random() < 0.4:
        text = "a photo of " + text
    if rng.random() < 0.5:
        text += f" on a {scene.background} background"
    if rng.random() < position_rate:
        text += f", {scene.position}" if rng.random() < 0.5 else f" at the {scene.position}"
    return text


def full_caption(scene: Scene, noun: str | None = None, color: bool = True) -> str:
    """The caption naming every attribute (all but the colour when ``color`` is false)."""
    named = f"{scene.size} {scene.color}" if color else scene.size
    return f"a photo of a {named} {noun or scene.shape} on a {scene.background} background, {scene.position}"


def caption_corpus(seed: int = 0, count: int = 4000) -> str:
    """Captions the toy-world tokenizer learns its BPE merges from."""
    rng = random.Random(seed)
    return "\n".join(caption(random_scene(rng, held_out=frozenset()), rng) for _ in range(count))


def to_array(images: list[Image.Image]) -> np.ndarray:
    """[N, 3, H, W] float32 in [-1, 1]."""
    stack = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return (stack / 127.5 - 1.0).transpose(0, 3, 1, 2)
