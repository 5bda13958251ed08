"""Aspect-ratio buckets: constant-area (w, h) sizes, and the nearest one for each image."""

from __future__ import annotations

import math


def make_buckets(resolution: int, min_side: int, max_side: int, step: int = 64) -> list[tuple[int, int]]:
    """Every (w, h), multiples of ``step`` within [min_side, max_side], with w*h <= resolution² as large as fits."""
    area = resolution * resolution
    buckets = {(resolution // step * step,) * 2}
    width = math.ceil(min_side / step) * step
    while width <= max_side:
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space; ties go to the larger)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def no_upscale_bucket(size: tuple[int, int], bucket: tuple[int, int], step: int) -> tuple[int, int]:
    """For an image smaller than ``bucket``: its own aspect, scaled to fit, sides rounded down to ``step``."""
    width, height = size
    if width * height >= bucket[0] * bucket[1]:
        return bucket
    return max(step, width // step * step), max(step, height // step * step)


def assign_buckets(
    sizes: list[tuple[int, int]], resolution: int, min_side: int, max_side: int, step: int, no_upscale: bool
) -> list[tuple[int, int]]:
    """The bucket (w, h) of each image size."""
    buckets = make_buckets(resolution, min_side, max_side, step)
    out = []
    for size in sizes:
        bucket = nearest_bucket(size, buckets)
        out.append(no_upscale_bucket(size, bucket, step) if no_upscale else bucket)
    return out
