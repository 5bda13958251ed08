"""`dreamtune sample`: render a prompt grid PNG, with or without a LoRA, optionally beside the base."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import fail


def _is_lycoris(path: Path) -> bool:
    """A kohya-layout file holding LoHa, LoKr or DoRA tensors."""
    from safetensors import safe_open

    from ..weights.lycoris_formats import is_lycoris

    if path.is_dir() or path.suffix != ".safetensors":
        return False
    with safe_open(str(path), "pt") as f:
        return is_lycoris(f.keys())


def run(args: argparse.Namespace) -> int:
    import torch

    from ..models.loading import load_pipeline
    from ..models.pipeline import inference_scheduler
    from ..models.render import render_images, save_grid

    lora = Path(args.lora) if args.lora else None
    if lora is not None and not lora.exists():
        return fail(f"--lora: {lora} does not exist")
    pipe = load_pipeline(args.model)
    pipe.scheduler = inference_scheduler(pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    kwargs = dict(
        images_per_prompt=args.images_per_prompt, seed=args.seed, steps=args.steps,
        guidance_scale=args.guidance_scale, resolution=resolution, negative_prompt=args.negative_prompt,
    )
    rows, labels = [], []
    with torch.no_grad():
        if lora is not None and args.with_base:
            rows += render_images(pipe, args.prompt, **kwargs)
            labels += [f"base: {p}" for p in args.prompt]
        if lora is not None and _is_lycoris(lora):  # LoHa/LoKr/DoRA: diffusers cannot load them; patch as a UI does
            from ..weights.lycoris_files import read_adapter
            from ..weights.lycoris_merge import patch_models

            patch_models(read_adapter(lora), {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, args.lora_scale)
        elif lora is not None:
            folder, name = (lora, None) if lora.is_dir() else (lora.parent, lora.name)
            pipe.load_lora_weights(str(folder), weight_name=name, adapter_name="lora")
            pipe.set_adapters(["lora"], adapter_weights=[args.lora_scale])
        rows += render_images(pipe, args.prompt, **kwargs)
    labels += [f"lora x{args.lora_scale}: {p}" if lora else p for p in args.prompt]
    path = save_grid(rows, Path(args.out), labels=labels)
    print(f"sample grid written to {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="render a prompt grid PNG, with or without a LoRA")
    p.add_argument("--model", required=True, help="diffusers folder, hub id or single-file .safetensors")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several rows")
    p.add_argument("--lora", help="a LoRA-family file (kohya/LyCORIS LoRA, DoRA, LoHa, LoKr, or diffusers) or a folder "
                   "holding pytorch_lora_weights")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--with-base", action="store_true", help="also render the base model's rows, first")
    p.add_argument("--out", default="samples.png", help="output PNG")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--negative-prompt")
    p.add_argument("--resolution", type=int, help="default: the model's native size")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
