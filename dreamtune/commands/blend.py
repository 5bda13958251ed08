"""`dreamtune blend`: weighted average / add-difference of checkpoints, run-checkpoint averaging, alpha sweeps."""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

from .common import fail, refuse_output_over_input


def _floats(text: str) -> list[float]:
    """``"0.7,0.3"`` -> ``[0.7, 0.3]`` (argparse type)."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _plan(args: argparse.Namespace) -> tuple[list[str], str]:
    """The input paths and the mode (weighted, add-difference, run-average) the flags ask for."""
    if args.run:
        if args.inputs or args.add_difference:
            raise ValueError("--run averages a run's checkpoints; give no other inputs")
        return [], "run-average"
    if args.add_difference:
        if args.inputs:
            raise ValueError("--add-difference A B C takes its three inputs itself; give no other inputs")
        return list(args.add_difference), "add-difference"
    if len(args.inputs) < 2:
        raise ValueError("blend needs at least two inputs (or --add-difference A B C, or --run DIR --last N)")
    return list(args.inputs), "weighted"


def _coefficients_for(mode: str, args: argparse.Namespace, count: int):
    """A function from a sweep value (or None) to the per-input coefficients."""
    from ..weights.blend import add_difference_coefficients, average_weights

    if mode == "add-difference":
        return lambda value: add_difference_coefficients(args.multiplier if value is None else value)
    if args.sweep is not None and count != 2:
        raise ValueError("--sweep varies alpha between exactly two inputs (or the add-difference multiplier)")
    return lambda value: average_weights(args.weights, args.alpha if value is None else value, count)


def _last_checkpoints(run_dir: Path | str, last: int, file_name: str = "trainable_unet.safetensors") -> list[Path]:
    """The ``file_name`` of the last ``last`` complete checkpoints of a run, oldest first."""
    from ..training.run_folder import RunFolder
    from ..weights.blend import BlendError

    if last < 1:
        raise BlendError(f"--last must be at least 1, got {last}")
    run = RunFolder(run_dir)
    found = run.list_checkpoints(containing=file_name)
    if len(found) < last:
        raise BlendError(
            f"{run.checkpoints} has {len(found)} checkpoint(s) with {file_name}; asked for the last {last}")
    return [folder / file_name for folder in found[-last:]]


def _run_average(args: argparse.Namespace) -> int:
    """Average the last N trainable-tensor checkpoints of a run into one file."""
    from ..models.dtypes import DTYPES
    from ..weights.blend import average_weights, combine, mix_all
    from ..weights.provenance import provenance
    from ..weights.safetensors_io import save_safetensors
    from ..weights.sources import open_state_file

    if args.format != "single-file" or not args.out.endswith(".safetensors"):
        return fail("--run writes one .safetensors file of the averaged trained tensors (--format single-file)")
    paths = _last_checkpoints(args.run, args.last, args.file_name)
    refuse_output_over_input(args.out, paths, args.in_place)
    weights = average_weights(None, None, len(paths))
    with ExitStack() as stack:
        sources = [stack.enter_context(open_state_file(p)) for p in paths]
        state = combine(sources, weights, mix_all, DTYPES.get(args.dtype))
    settings = {"mode": "run-average", "checkpoints": [p.parent.name for p in paths], "weights": weights}
    meta = provenance("blend", paths, settings, hash_inputs=not args.no_hash)
    save_safetensors(state, args.out, meta)
    print(f"averaged {len(paths)} checkpoints ({', '.join(p.parent.name for p in paths)}) -> {args.out}")
    return 0


def _label(image, text: str):
    """Draw ``text`` in the tile's top-left corner (the column label of a sweep grid)."""
    from PIL import ImageDraw

    tile = image.copy()
    draw = ImageDraw.Draw(tile)
    draw.rectangle((0, 0, 6 * len(text) + 3, 11), fill="white")
    draw.text((2, 0), text, fill="black")
    return tile


def _sweep(args, sources, coefficients_for, mixed, config_dir: Path, name: str) -> int:
    """Render one grid: a row per prompt, a column per sweep value, each blended state built in turn."""
    import torch

    from ..models.pipeline import inference_scheduler
    from ..models.render import render_images, save_grid
    from ..weights.blend import sweep_states
    from ..weights.single_file import pipeline_from_state

    if not args.prompt:
        return fail("--sweep needs at least one --prompt")
    if not args.out.endswith(".png"):
        return fail("with --sweep, --out is the grid image and must end in .png")
    columns: list[list] = []
    for value, state in sweep_states(sources, args.sweep, coefficients_for, mixed):
        pipe = pipeline_from_state(state, config_dir)
        del state
        pipe.scheduler = inference_scheduler(pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)
        resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        with torch.no_grad():
            rows = render_images(pipe, args.prompt, images_per_prompt=1, seed=args.seed, steps=args.steps,
                                 guidance_scale=args.guidance_scale, resolution=resolution)
        columns.append([_label(row[0], f"{name}={value:g}") for row in rows])
        del pipe
    grid = [[column[r] for column in columns] for r in range(len(args.prompt))]
    path = save_grid(grid, Path(args.out), labels=list(args.prompt))
    print(f"sweep grid ({len(args.prompt)} prompts x {len(args.sweep)} values of {name}) written to {path}")
    return 0


def _blend(args: argparse.Namespace, paths: list[str], mode: str) -> int:
    """Blend checkpoints (any mix of single-file and diffusers folders) into one output."""
    from ..models.dtypes import DTYPES
    from ..weights.blend import combine, mixed_keys_filter
    from ..weights.checkpoint import open_checkpoint, save_checkpoint
    from ..weights.diffusers_folder import config_dir_for
    from ..weights.provenance import provenance

    refuse_output_over_input(args.out, paths, args.in_place, output_is_folder=args.format == "diffusers")
    coefficients_for = _coefficients_for(mode, args, len(paths))
    mixed = mixed_keys_filter(args.unet_only)
    config_dir = config_dir_for(paths, args.config_dir)
    with ExitStack() as stack:
        sources = [stack.enter_context(open_checkpoint(p, args.allow_pickle)) for p in paths]
        if args.sweep is not None:
            return _sweep(args, sources, coefficients_for, mixed, config_dir,
                          "m" if mode == "add-difference" else "alpha")
        coefficients = coefficients_for(None)
        state = combine(sources, coefficients, mixed, DTYPES.get(args.dtype))
    settings = {"mode": mode, "coefficients": coefficients, "unet_only": args.unet_only,
                "vae_from": Path(paths[0]).name, "dtype": args.dtype or "as first input"}
    if mode == "add-difference":
        settings["multiplier"] = args.multiplier
    meta = provenance("blend", paths, settings, hash_inputs=not args.no_hash)
    out = save_checkpoint(state, args.out, args.format, meta, config_dir)
    print(f"blended {len(paths)} inputs ({mode}, coefficients {[round(c, 6) for c in coefficients]}) -> {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        paths, mode = _plan(args)
        if mode == "run-average":
            return _run_average(args)
        return _blend(args, paths, mode)
    except (ValueError, FileNotFoundError) as err:  # WeightsError is a ValueError
        return fail(str(err))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("blend", help="weighted average / add-difference of checkpoints; average a run's checkpoints",
                       description="Blend SD 1.x checkpoints (single-file .safetensors or diffusers folders, mixed "
                       "freely). VAE always comes from the first input.")
    p.add_argument("inputs", nargs="*", help="checkpoints to blend (single-file .safetensors or diffusers folders)")
    p.add_argument("--out", required=True, help="output .safetensors, diffusers folder, or .png with --sweep")
    p.add_argument("--weights", type=_floats, help="comma-separated weights, one per input (normalized to sum 1)")
    p.add_argument("--alpha", type=float, help="two inputs: alpha*first + (1-alpha)*second")
    p.add_argument("--add-difference", nargs=3, metavar=("A", "B", "C"), help="A + multiplier*(B - C)")
    p.add_argument("--multiplier", type=float, default=1.0, help="add-difference multiplier (default 1)")
    p.add_argument("--unet-only", action="store_true", help="blend only the UNet; text encoder from the first input")
    p.add_argument("--format", choices=["single-file", "diffusers"], default="single-file")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="output dtype (default: the first input's)")
    p.add_argument("--config-dir", help="diffusers folder whose configs describe single-file inputs "
                   "(default: the first diffusers-folder input, else SD 1.5)")
    p.add_argument("--allow-pickle", action="store_true", help="accept .ckpt/.pt/.bin (torch weights_only load)")
    p.add_argument("--no-hash", action="store_true", help="skip the input sha256 in the output metadata")
    p.add_argument("--in-place", action="store_true", help="allow --out to replace one of the inputs")
    p.add_argument("--run", help="a training output dir: average its last checkpoints")
    p.add_argument("--last", type=int, default=3, help="with --run: how many checkpoints (default 3)")
    p.add_argument("--file-name", default="trainable_unet.safetensors", help="with --run: the file in each checkpoint")
    p.add_argument("--sweep", type=_floats, help="alphas (or add-difference multipliers) to render side by side")
    p.add_argument("--prompt", action="append", help="with --sweep: a prompt; repeat for several rows")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--resolution", type=int, help="with --sweep: default the model's native size")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
