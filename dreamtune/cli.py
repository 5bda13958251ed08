"""`dreamtune` console script: thin subcommands over the packages; `--help` is the reference."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _quiet_libraries() -> None:
    """Keep the libraries' own progress bars and notices out of our output."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="accelerate")


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def cmd_train(args: argparse.Namespace) -> int:
    from .data.sources import DataSourceError
    from .trainers.config import ConfigError, load_config
    from .trainers.loop import TrainingDiverged, train
    from .trainers.models import ModelLoadError

    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg)
    except (ConfigError, ModelLoadError, DataSourceError, FileNotFoundError) as err:
        return _fail(str(err))
    except TrainingDiverged as err:
        return _fail(str(err), code=1)
    except ValueError as err:  # config values that only the method or accelerate can judge
        return _fail(str(err))
    from accelerate import PartialState

    if PartialState().is_main_process and not result.interrupted:
        print(f"\ndone: {result.global_step} steps, last loss {result.last_loss:.4f}")
        for path in result.exported:
            print(f"  exported  {path}")
        for path in result.samples[-1:]:
            print(f"  samples   {path}")
        print(f"  model card {result.output_dir / 'README.md'}")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from .trainers.tiny_model import save_tiny_model

    out = save_tiny_model(args.out, seed=args.seed)
    print(f"tiny SD 1.x model (random weights, seed {args.seed}) written to {out}")
    return 0


def _load_pipeline(model: str):
    """A pipeline from a diffusers folder/hub id or a single-file checkpoint."""
    from diffusers import StableDiffusionPipeline

    if model.endswith(".safetensors") and Path(model).is_file():
        from .weights.single_file import load_single_file_pipeline

        return load_single_file_pipeline(model)
    return StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .trainers.sampling import inference_scheduler, render_images, save_grid

    pipe = _load_pipeline(args.model)
    pipe.scheduler = inference_scheduler(pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    kwargs = dict(
        images_per_prompt=args.images_per_prompt, seed=args.seed, steps=args.steps,
        guidance_scale=args.guidance_scale, resolution=resolution, negative_prompt=args.negative_prompt,
    )
    rows, labels = [], []
    if args.lora and args.with_base:
        rows += render_images(pipe, args.prompt, **kwargs)
        labels += [f"base: {p}" for p in args.prompt]
    if args.lora:
        lora = Path(args.lora)
        if not lora.exists():
            return _fail(f"--lora: {lora} does not exist")
        if lora.is_dir():
            pipe.load_lora_weights(str(lora), adapter_name="lora")
        else:
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="lora")
        pipe.set_adapters(["lora"], adapter_weights=[args.lora_scale])
    with torch.no_grad():
        rows += render_images(pipe, args.prompt, **kwargs)
    labels += [f"lora x{args.lora_scale}: {p}" if args.lora else p for p in args.prompt]
    path = save_grid(rows, Path(args.out), labels=labels)
    print(f"sample grid written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dreamtune", description="Fine-tune Stable Diffusion 1.x: DreamBooth, LoRA, Textual Inversion."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train with a YAML config (same as `accelerate launch train.py`)")
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=800")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("make-tiny-model", help="build the tiny random SD 1.x model used by tests and the quickstart")
    p.add_argument("out", help="output folder (diffusers format)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("sample", help="render a prompt grid PNG, with or without a LoRA")
    p.add_argument("--model", required=True, help="diffusers folder, hub id or single-file .safetensors")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several rows")
    p.add_argument("--lora", help="a LoRA file (kohya or diffusers) or a folder with pytorch_lora_weights")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--with-base", action="store_true", help="also render the base model's rows, for comparison")
    p.add_argument("--out", default="samples.png", help="output PNG")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--negative-prompt")
    p.add_argument("--resolution", type=int, help="default: the model's native size")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
