"""`dreamtune convert`: diffusers folder <-> single file, PEFT/diffusers LoRA <-> kohya, diffusers TI <-> A1111."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import WeightsError
from .common import fail, refuse_output_over_input

#: For each (kind, layout) of the input, the target ``--to auto`` picks: the other layout.
_AUTO = {
    ("checkpoint", "diffusers"): "single-file",
    ("checkpoint", "single-file"): "diffusers",
    ("lora", "kohya"): "diffusers",
    ("lora", "diffusers"): "kohya",
    ("lora", "peft"): "kohya",
    ("textual-inversion", "diffusers"): "a1111",
    ("textual-inversion", "a1111"): "diffusers",
}


def _kind(path: str, allow_pickle: bool) -> tuple[str, str]:
    """(kind, layout) of the input, read from its header."""
    from ..weights.describe import describe

    info = describe(path, allow_pickle=allow_pickle)
    if path.endswith((".pt", ".bin")) and info["kind"] == "textual-inversion":
        return "textual-inversion", "a1111"
    return info["kind"], info["layout"]


def _convert(args: argparse.Namespace) -> Path:
    """Dispatch on the input's kind; returns the written path."""
    from ..models.dtypes import DTYPES
    from ..weights.checkpoint import convert_checkpoint
    from ..weights.embeddings import convert_embedding
    from ..weights.lycoris_files import convert_adapter
    from ..weights.provenance import provenance

    kind, layout = _kind(args.input, args.allow_pickle)
    if kind not in ("checkpoint", "lora", "textual-inversion") or (kind, layout) not in _AUTO:
        raise WeightsError(f"{args.input} is a {kind} ({layout}); convert handles SD 1.x checkpoints, LoRAs and "
                           "TI embeddings")
    target = _AUTO[(kind, layout)] if args.to == "auto" else args.to
    refuse_output_over_input(args.output, [args.input], args.in_place,
                             output_is_folder=target == "diffusers" if kind == "checkpoint" else None)
    dtype = DTYPES.get(args.dtype)
    meta = provenance("convert", [args.input], {"from": f"{kind}/{layout}", "to": target, "dtype": args.dtype},
                      hash_inputs=not args.no_hash)
    if kind == "checkpoint":
        return convert_checkpoint(args.input, args.output, target, dtype, meta, args.config_dir, args.allow_pickle)
    if kind == "lora":
        return convert_adapter(args.input, args.output, target, dtype, meta, args.allow_pickle)
    return convert_embedding(args.input, args.output, target, dtype, meta, args.token, args.allow_pickle)


def run(args: argparse.Namespace) -> int:
    try:
        out = _convert(args)
    except (ValueError, FileNotFoundError, KeyError) as err:  # WeightsError is a ValueError
        return fail(str(err))
    print(f"converted {args.input} -> {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert checkpoints, LoRAs and TI embeddings between layouts / dtypes",
                       description="checkpoint: diffusers folder <-> single-file .safetensors; LoRA: "
                       "diffusers/PEFT <-> kohya; TI: diffusers {token: vectors} <-> A1111 emb_params.")
    p.add_argument("input", help="a .safetensors file or a diffusers folder")
    p.add_argument("output", help="output file (or folder for a diffusers checkpoint / LoRA folder)")
    p.add_argument("--to", default="auto", choices=["auto", "single-file", "diffusers", "kohya", "a1111"],
                   help="target layout (auto: the other layout of the input's kind)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="output dtype (default: keep)")
    p.add_argument("--token", help="TI to diffusers: the token to store (default: the file name)")
    p.add_argument("--config-dir", help="diffusers folder whose configs describe a single-file checkpoint "
                   "(default SD 1.5)")
    p.add_argument("--allow-pickle", action="store_true", help="accept .ckpt/.pt/.bin (torch weights_only load)")
    p.add_argument("--no-hash", action="store_true", help="skip the input sha256 in the output metadata")
    p.add_argument("--in-place", action="store_true", help="allow the output to replace the input (same layout only)")
    p.set_defaults(func=run)
