"""`dreamtune extract-lora`: a LoRA from a fine-tune (DreamBooth output or any SD 1.x checkpoint) against its base."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from ..models.dtypes import dtype_of
    from ..weights.checkpoint import open_checkpoint
    from ..weights.bundled_words import TOKEN_EMBEDDING_KEY, trigger_rows
    from ..weights.diffusers_folder import config_dir_for, load_clip_tokenizer, read_config
    from ..weights.embeddings import bundle_tensors
    from ..weights.ldm_keys import unet_key_map
    from ..weights.lora_formats import kohya_metadata
    from ..weights.lora_rank import RankChoice, extract_lora, summary
    from ..weights.provenance import provenance
    from ..weights.safetensors_io import save_safetensors

    choice = RankChoice(rank=args.rank, energy=args.energy, max_rank=args.max_rank)
    config_dir = config_dir_for([args.base, args.tuned], args.config_dir)
    unet_map = unet_key_map(read_config(config_dir, "unet"))
    with open_checkpoint(args.base, args.allow_pickle) as base, open_checkpoint(args.tuned, args.allow_pickle) as tuned:
        tensors, reports, left_out = extract_lora(base, tuned, unet_map, choice, text_encoder=args.text_encoder,
                                                  min_change=args.min_change, dtype=dtype_of(args.dtype))
        if args.trigger:
            tokenizer = load_clip_tokenizer(config_dir / "tokenizer")
            for word in args.trigger:
                tensors.update(bundle_tensors(word, trigger_rows(base, tuned, tokenizer, word), dtype=dtype_of(args.dtype)))
    ranks = [r.rank for r in reports]
    settings = {"rank": args.rank, "energy": args.energy, "max_rank": args.max_rank,
                "text_encoder": args.text_encoder, "dtype": args.dtype, "trigger": args.trigger or []}
    metadata = {
        **kohya_metadata(rank=max(ranks), alpha=float(max(ranks)), title=Path(args.out).stem,
                         base_model=str(args.base), tensors=tensors,
                         training_comment=f"extracted by dreamtune extract-lora from {Path(args.tuned).name}"),
        **provenance("extract-lora", [args.base, args.tuned], settings, hash_inputs=not args.no_hash),
    }
    out = save_safetensors(tensors, args.out, metadata=metadata)
    print(f"extracted {summary(reports)} -> {out}")
    if left_out and TOKEN_EMBEDDING_KEY in left_out and not args.trigger:
        print("  the token embedding changed: --trigger WORD carries the trigger word's rows (A1111, merge-lora)")
    if left_out:
        print(f"  not representable by a LoRA (biases, norms, embeddings, VAE): {len(left_out)} changed tensors, "
              f"e.g. {left_out[0]}")
    if args.report:
        rows = [{"part": r.part, "module": r.module, "rank": r.rank, "full_rank": r.full_rank, "energy": r.energy}
                for r in reports]
        Path(args.report).write_text(json.dumps({"modules": rows, "not_representable": left_out}, indent=2) + "\n")
    return 0


def add_rank_arguments(p: argparse.ArgumentParser) -> None:
    """--rank / --energy / --max-rank / --dtype, shared by extract-lora and resize-lora."""
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="fixed rank for every module")
    how.add_argument("--energy", type=float,
                     help="dynamic rank: the smallest that keeps this fraction of each module's squared singular values")
    p.add_argument("--max-rank", type=int, help="cap for --energy (default: none)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="tensor dtype of the file")
    p.add_argument("--report", help="write each module's rank and kept energy to this JSON file")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract-lora", help="a LoRA (kohya file) from a fine-tune against its base, by SVD per module")
    p.add_argument("base", help="the base checkpoint: single-file .safetensors or diffusers folder")
    p.add_argument("tuned", help="the fine-tune of that base (e.g. a DreamBooth run's final/ file or folder)")
    p.add_argument("--out", required=True, help="output .safetensors (kohya LoRA, loads in A1111/ComfyUI/InvokeAI)")
    add_rank_arguments(p)
    p.add_argument("--text-encoder", action="store_true", help="also extract the text encoder's attention and MLP")
    p.add_argument("--trigger", action="append", metavar="WORD",
                   help="also carry this word's token-embedding rows from the fine-tune, bundled as an embedding "
                   "named WORD (A1111 applies it with the LoRA; merge-lora writes it back); repeat for several")
    p.add_argument("--min-change", type=float, default=1e-6, help="a layer that moved less than this is skipped")
    p.add_argument("--config-dir", help="diffusers folder whose configs describe single-file inputs (default SD 1.5)")
    p.add_argument("--allow-pickle", action="store_true", help="accept .ckpt/.pt/.bin (torch weights_only load)")
    p.add_argument("--no-hash", action="store_true", help="skip the inputs' sha256 in the output metadata")
    p.set_defaults(func=run)
