"""`dreamtune merge-lora`: bake LoRA-family files (kohya/LyCORIS LoRA, LoCon, DoRA, LoHa, LoKr, or diffusers/PEFT
LoRA, each with a scale) into a base checkpoint."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .common import fail, refuse_output_over_input


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """``file.safetensors:0.8`` -> (path, 0.8); no ``:scale`` means 1.0."""
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            return Path(path), float(scale)
        except ValueError:
            pass
    return Path(text), 1.0


def _unet_map(base: str, config_dir: str | None):
    """The UNet key map of the base (its own config for a folder, else --config-dir or SD 1.5)."""
    from ..weights.diffusers_folder import config_dir_for, read_config
    from ..weights.ldm_keys import unet_key_map

    folder = config_dir_for([base], config_dir)
    return unet_key_map(read_config(folder, "unet")), folder


def run(args: argparse.Namespace) -> int:
    from ..models.dtypes import DTYPES
    from ..weights.bundled_words import merge_bundled_words
    from ..weights.checkpoint import open_checkpoint, save_checkpoint
    from ..weights.diffusers_folder import load_clip_tokenizer
    from ..weights.lycoris_files import read_adapter
    from ..weights.lycoris_merge import merge_adapters
    from ..weights.merge import describe_loras, text_encoder_module_names, unet_module_names
    from ..weights.provenance import provenance

    loras = [parse_lora_arg(text) for text in args.lora]
    try:
        bad = [text for text, (_, scale) in zip(args.lora, loras) if not math.isfinite(scale)]
        if bad:
            return fail(f"--lora {bad[0]}: the scale must be a finite number (e.g. FILE:0.8)")
        refuse_output_over_input(args.out, [args.base, *(p for p, _ in loras)], args.in_place,
                                 output_is_folder=args.format == "diffusers")
        unet_map, config_dir = _unet_map(args.base, args.config_dir)
        with open_checkpoint(args.base, args.allow_pickle) as base:
            te_names = text_encoder_module_names(base)
            files = [(read_adapter(p, args.allow_pickle, unet_module_names(unet_map), te_names), s) for p, s in loras]
            state = merge_adapters(base, files, unet_map, DTYPES.get(args.dtype))
        words, skipped = [], {}
        if any(adapters.embeddings for adapters, _ in files):  # the tokenizer only where a bundled word needs it
            words, skipped = merge_bundled_words(state, files, load_clip_tokenizer(config_dir / "tokenizer"))
        settings = {"loras": describe_loras([p for p, _ in loras], [s for _, s in loras]),
                    "dtype": args.dtype or "as base"}
        meta = provenance("merge-lora", [args.base, *(p for p, _ in loras)], settings, hash_inputs=not args.no_hash)
        out = save_checkpoint(state, args.out, args.format, meta, config_dir)
    except (ValueError, FileNotFoundError, KeyError) as err:  # WeightsError is a ValueError
        return fail(str(err))
    print(f"merged {len(loras)} LoRA(s) into {Path(args.base).name} -> {out}")
    if words:
        print(f"  bundled word(s) written into the token embedding: {', '.join(words)}")
    for word, why in skipped.items():
        print(f"  bundled embedding {word!r} not merged: {why}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge-lora", help="bake LoRAs into a checkpoint (linear and conv layers, alpha/rank honoured)")
    p.add_argument("base", help="base checkpoint: single-file .safetensors or diffusers folder")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:SCALE]",
                   help="a kohya/LyCORIS (LoRA, LoCon, DoRA, LoHa, LoKr) or diffusers/PEFT LoRA file with an "
                   "optional scale; repeat for several")
    p.add_argument("--out", required=True, help="output .safetensors (or a folder with --format diffusers)")
    p.add_argument("--format", choices=["single-file", "diffusers"], default="single-file")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="output dtype (default: the base's)")
    p.add_argument("--config-dir", help="diffusers folder whose configs describe a single-file base (default SD 1.5)")
    p.add_argument("--allow-pickle", action="store_true", help="accept .ckpt/.pt/.bin (torch weights_only load)")
    p.add_argument("--no-hash", action="store_true", help="skip the input sha256 in the output metadata")
    p.add_argument("--in-place", action="store_true", help="allow --out to replace the base checkpoint")
    p.set_defaults(func=run)
