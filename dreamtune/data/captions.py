"""Caption templates for learning a new word: the object and style sets of the Textual Inversion paper.

The lists are the ones of the original paper's code and of diffusers' textual_inversion example
(ImageNet-style prompts; the style list repeats two entries, which we keep: it weights the draw).
Each template holds one ``{}`` where the placeholder word goes.
"""

from __future__ import annotations

import random
from typing import Literal

LearnableProperty = Literal["object", "style"]

OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

TEMPLATES: dict[str, tuple[str, ...]] = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def templates_for(learnable_property: str) -> tuple[str, ...]:
    """The template set for ``object`` or ``style``."""
    if learnable_property not in TEMPLATES:
        raise ValueError(
            f"learnable_property: {learnable_property!r} has no templates; choose one of {', '.join(TEMPLATES)}"
        )
    return TEMPLATES[learnable_property]


def pick_template(
    learnable_property: str,
    *,
    rng: random.Random | None = None,
    seed: int = 0,
    epoch: int = 0,
    index: int = 0,
) -> str:
    """One template: drawn from ``rng`` when given, else fixed by (seed, epoch, index) on every platform."""
    chooser = rng if rng is not None else random.Random(f"{seed}:{epoch}:{index}")
    return chooser.choice(templates_for(learnable_property))


def ensure_token(caption: str, token: str) -> str:
    """``caption`` unchanged when it contains ``token``, else with ``token`` in front."""
    return caption if token in caption else f"{token} {caption}".strip()
