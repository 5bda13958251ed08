"""Generate toy-world images for prompts and score them with the classifier."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int, steps: int = 20, guidance: float = 5.0, batch: int = 64):
    """One image per prompt, image i drawn from seed ``seed + i`` (DPM-Solver++), in batches."""
    from diffusers import DPMSolverMultistepScheduler

    from ..models.pipeline import inference_scheduler

    if not isinstance(pipe.scheduler, DPMSolverMultistepScheduler):
        pipe.scheduler = inference_scheduler(pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, height=size,
                       width=size, generator=generators).images
    return images


def score(predictions: list[dict[str, str]], expected: list[dict[str, str]]) -> dict[str, float]:
    """Share of images matching every expected attribute ('both'), and each attribute alone."""
    keys = sorted({k for e in expected for k in e})
    out = {"both": sum(all(p[k] == v for k, v in e.items()) for p, e in zip(predictions, expected)) / len(expected)}
    for k in keys:
        pairs = [(p[k], e[k]) for p, e in zip(predictions, expected) if k in e]
        out[k] = sum(a == b for a, b in pairs) / len(pairs)
    return out


def classify_prompts(pipe, judge, cases, per_prompt: int, seed: int, **gen_kwargs) -> dict[str, float]:
    """Generate ``per_prompt`` images for each (prompt, shape, colour, position) case and score them.

    'both' is shape and colour right together (the quality bar); 'position' is scored on its own.
    """
    prompts, expected = [], []
    for prompt, shape, color, position in cases:
        prompts += [prompt] * per_prompt
        expected += [{"shape": shape, "color": color, "position": position}] * per_prompt
    predictions = judge.predict(generate(pipe, prompts, seed, **gen_kwargs))
    result = score(predictions, [{k: e[k] for k in ("shape", "color")} for e in expected])
    result["position"] = score(predictions, [{"position": e["position"]} for e in expected])["both"]
    return result
