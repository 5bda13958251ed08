"""`dreamtune evaluate`: CLIP-T / CLIP-I / DINO over image folders (--metrics), or the toy-world benchmark."""

from __future__ import annotations

import argparse
import json

from .common import fail

DEFAULT_TRAINERS = "lora,dreambooth,dreambooth_prior,textual_inversion"


def _table(result: dict, per_image: bool) -> str:
    """Readable lines from :func:`dreamtune.evaluation.metrics.evaluate`'s result."""
    models = result["models"]
    detail = {
        "clip_t": f"{result['images']} images vs their prompts ({models.get('clip')})",
        "clip_i": f"{result['images']} x {result['reference']} image pairs ({models.get('clip')})",
        "dino": f"{result['images']} x {result['reference']} image pairs ({models.get('dino')})",
    }
    lines = [f"{'metric':<8}{'mean':>8}  detail"]
    lines += [f"{name:<8}{mean:>8.4f}  {detail[name]}" for name, mean in result["metrics"].items()]
    if per_image:
        names = list(result["metrics"])
        files = list(result["per_image"][names[0]])
        lines += ["", "  ".join(f"{name:>8}" for name in names) + "  image"]
        lines += ["  ".join(f"{result['per_image'][name][file]:>8.4f}" for name in names) + f"  {file}"
                  for file in files]
    return "\n".join(lines)


def _metrics(args: argparse.Namespace) -> int:
    from transformers.utils import logging as transformers_logging

    from ..evaluation.metrics import evaluate

    transformers_logging.disable_progress_bar()
    if not args.images:
        return fail("--metrics needs --images DIR (the generated images)")
    try:
        result = evaluate(
            args.images, reference=args.reference, prompts=args.prompts, metrics=args.metrics,
            clip_model=args.clip_model, dino_model=args.dino_model, device=args.device,
            batch_size=args.batch_size, clip_revision=args.clip_revision, dino_revision=args.dino_revision,
        )
    except ValueError as err:  # EvaluationError, or BadImageError naming an unreadable image
        return fail(str(err))
    print(json.dumps(result, indent=2) if args.json else _table(result, args.per_image))
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    if args.samples < 1:
        return fail(f"--samples must be at least 1, got {args.samples}")
    if args.seeds is not None:
        parts = [p.strip() for p in args.seeds.split(",")]
        if not parts or not all(p.lstrip("-").isdigit() for p in parts) or len(set(parts)) != len(parts):
            return fail(f"--seeds must be distinct integers separated by commas, e.g. 0,1,2; got {args.seeds!r}")
        args.seeds = [int(p) for p in parts]
    try:
        from ..toyworld.benchmark import run_from_args
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("dreamtune.toyworld"):
            raise
        return fail(f"--benchmark {args.benchmark}: module {err.name} is not part of this installation")
    code = run_from_args(args)
    return 0 if code is None else int(code)


def run(args: argparse.Namespace) -> int:
    return _benchmark(args) if args.benchmark else _metrics(args)


def register(sub: argparse._SubParsersAction) -> None:
    from ..evaluation.metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL

    p = sub.add_parser(
        "evaluate", help="score generated images (CLIP-T, CLIP-I, DINO) or run the toy-world trainer benchmark",
        description="Either --metrics over folders of generated and reference images, or --benchmark toyworld.",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--metrics", help="comma list of clip_t, clip_i, dino")
    mode.add_argument("--benchmark", choices=["toyworld"], help="train each trainer on the toy world and score it")
    metrics = p.add_argument_group("--metrics options")
    metrics.add_argument("--images", help="folder of generated images (searched recursively, sorted by path)")
    metrics.add_argument("--reference", help="folder of real images of the subject (for clip_i and dino)")
    metrics.add_argument("--prompts", help="for clip_t: a text file with one prompt per line, one line per image "
                         "in sorted path order, or a .jsonl of {file_name, prompt}; default: a .txt beside each image")
    metrics.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help="CLIP model: hub id or local folder")
    metrics.add_argument("--dino-model", default=DEFAULT_DINO_MODEL, help="DINO ViT model: hub id or local folder")
    metrics.add_argument("--clip-revision", help="hub revision of --clip-model (default: one with safetensors)")
    metrics.add_argument("--dino-revision", help="hub revision of --dino-model (default: one with safetensors)")
    metrics.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    metrics.add_argument("--batch-size", type=int, default=32)
    metrics.add_argument("--json", action="store_true", help="print the result (means and per-image values) as JSON")
    metrics.add_argument("--per-image", action="store_true", help="also list each image's values in the table")
    bench = p.add_argument_group("--benchmark options")
    bench.add_argument("--out", default="runs/toyworld-benchmark", help="folder for the benchmark's runs and table")
    bench.add_argument("--trainers", default=DEFAULT_TRAINERS, help=f"comma list (default: {DEFAULT_TRAINERS})")
    bench.add_argument("--samples", type=int, default=32, help="images generated per evaluated prompt")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--seeds", help="comma list of seeds: one run each, then the mean and range per trainer "
                                       "(targets judged on the mean); overrides --seed")
    bench.add_argument("--quick", action="store_true", help="a short smoke run instead of the full benchmark")
    p.set_defaults(func=run)
