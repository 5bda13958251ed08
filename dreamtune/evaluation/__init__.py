"""How well a trained concept shows in generated images: the DreamBooth paper's CLIP-T, CLIP-I and DINO."""

from .metrics import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    METRICS,
    EvaluationError,
    evaluate,
    list_images,
    load_prompts,
    parse_metrics,
)

__all__ = [
    "DEFAULT_CLIP_MODEL", "DEFAULT_DINO_MODEL", "METRICS", "EvaluationError", "evaluate", "list_images",
    "load_prompts", "parse_metrics",
]
