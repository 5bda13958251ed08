"""Render prompt grids: validation during training, `dreamtune sample`, the toy-world benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, ImageDraw


@torch.no_grad()
def render_images(
    pipe,
    prompts: list[str],
    *,
    images_per_prompt: int,
    seed: int,
    steps: int,
    guidance_scale: float,
    resolution: int,
    negative_prompt: str | None = None,
    stop: Callable[[], bool] | None = None,
    encode: Callable[[str], torch.Tensor] | None = None,
    **call_kwargs: Any,
) -> list[list[Image.Image]]:
    """images[prompt][k] drawn with seed ``seed + k``: the same seeds give comparable grids. When ``stop()``
    turns true (a Ctrl-C), the rows finished so far are returned before the next image. ``encode`` (a text ->
    [1, tokens, width] function) replaces the pipeline's own prompt encoding, the negative prompt's too."""
    rows = []
    for prompt in prompts:
        texts: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative_prompt}
        if encode is not None:
            texts = {"prompt_embeds": encode(prompt), "negative_prompt_embeds": encode(negative_prompt or "")}
        row = []
        for k in range(images_per_prompt):
            if stop is not None and stop():
                return rows
            generator = torch.Generator(device="cpu").manual_seed(seed + k)
            result = pipe(
                **texts,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                generator=generator,
                **call_kwargs,
            )
            row.append(result.images[0])
        rows.append(row)
    return rows


def make_grid(rows: list[list[Image.Image]], labels: list[str] | None = None) -> Image.Image:
    """One image: a row per prompt, labelled with the prompt when ``labels`` are given."""
    width, height = rows[0][0].size
    label_h = 14 if labels else 0
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (columns * width, len(rows) * (height + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        top = r * (height + label_h)
        if labels:
            draw.text((2, top + 1), labels[r][: max(8, columns * width // 6)], fill="black")
        for c, image in enumerate(row):
            grid.paste(image, (c * width, top + label_h))
    return grid


def save_grid(rows: list[list[Image.Image]], path: Path, labels: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, labels).save(path)
    return path


def side_by_side(left: Path, right: Path, path: Path, titles: tuple[str, str]) -> Path:
    """Two grids next to each other under a title each: base vs trained at a glance."""
    a, b = Image.open(left).convert("RGB"), Image.open(right).convert("RGB")
    title_h, gap = 14, 6
    out = Image.new("RGB", (a.width + gap + b.width, title_h + max(a.height, b.height)), "white")
    draw = ImageDraw.Draw(out)
    for x, image, title in ((0, a, titles[0]), (a.width + gap, b, titles[1])):
        draw.text((x + 2, 1), title, fill="black")
        out.paste(image, (x, title_h))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path
