"""`dreamtune resize-lora`: re-rank a LoRA (kohya or diffusers) by SVD, fixed or by kept energy."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .extract_lora import add_rank_arguments


def run(args: argparse.Namespace) -> int:
    from ..models.dtypes import dtype_of
    from ..weights.lora_files import read_lora
    from ..weights.lora_formats import kohya_metadata
    from ..weights.lora_rank import RankChoice, resize_lora, summary
    from ..weights.provenance import provenance
    from ..weights.safetensors_io import save_safetensors

    choice = RankChoice(rank=args.rank, energy=args.energy, max_rank=args.max_rank)
    lora = read_lora(Path(args.lora), args.allow_pickle)
    tensors, reports = resize_lora(lora, choice, dtype=dtype_of(args.dtype))
    ranks = [r.rank for r in reports]
    # The original's training record (steps, seed, learning rates) stays; its size and hashes are recomputed.
    carried = {k: v for k, v in lora.metadata.items() if k.startswith("ss_") and "hash" not in k
               and k not in ("ss_network_dim", "ss_network_alpha", "ss_training_comment")}
    metadata = {
        **kohya_metadata(rank=max(ranks), alpha=float(max(ranks)), title=Path(args.out).stem, tensors=tensors,
                         training_comment=f"resized by dreamtune resize-lora from {Path(args.lora).name}",
                         extra=carried),
        **provenance("resize-lora", [args.lora], {"rank": args.rank, "energy": args.energy,
                                                  "max_rank": args.max_rank, "dtype": args.dtype},
                     hash_inputs=not args.no_hash),
    }
    out = save_safetensors(tensors, args.out, metadata=metadata)
    print(f"resized {summary(reports)} -> {out}")
    if args.report:
        rows = [{"part": r.part, "module": r.module, "rank": r.rank, "old_rank": r.full_rank, "energy": r.energy}
                for r in reports]
        Path(args.report).write_text(json.dumps({"modules": rows}, indent=2) + "\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resize-lora", help="re-rank a LoRA by SVD (fixed rank or kept energy), written as kohya")
    p.add_argument("lora", help="a kohya or diffusers/PEFT LoRA .safetensors")
    p.add_argument("--out", required=True, help="output .safetensors (kohya LoRA)")
    add_rank_arguments(p)
    p.add_argument("--allow-pickle", action="store_true", help="accept .ckpt/.pt/.bin (torch weights_only load)")
    p.add_argument("--no-hash", action="store_true", help="skip the input's sha256 in the output metadata")
    p.set_defaults(func=run)
