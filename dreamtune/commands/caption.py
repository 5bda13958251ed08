"""`dreamtune caption DIR`: write .txt caption sidecars with a BLIP model, skipping existing ones."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import fail


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..data.autocaption import caption_folder, find_images

    if args.batch_size < 1:
        return fail("--batch-size must be at least 1")
    if not args.extension.startswith("."):
        return fail(f"--extension must start with '.', got {args.extension!r}")
    try:
        total = len(find_images(Path(args.dir))) if Path(args.dir).is_dir() else None
        with tqdm(total=total, desc="captioning", unit="img") as bar:
            result = caption_folder(
                args.dir, model=args.model, prefix=args.prefix, overwrite=args.overwrite,
                batch_size=args.batch_size, extension=args.extension, max_new_tokens=args.max_new_tokens,
                progress=bar.update,
            )
    except FileNotFoundError as err:
        return fail(str(err))
    except OSError as err:  # a model id or folder transformers cannot open
        return fail(f"--model {args.model}: cannot load a BLIP captioner ({err})")
    print(result.summary())
    return 1 if result.failed and not result.written else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("caption", help="write .txt caption files beside images with a BLIP model")
    p.add_argument("dir", help="folder of images (searched recursively)")
    p.add_argument("--model", default="Salesforce/blip-image-captioning-base",
                   help="BLIP captioning model: hub id or local folder")
    p.add_argument("--prefix", default="", help="text put first in every caption, e.g. the trigger word 'sks'")
    p.add_argument("--overwrite", action="store_true", help="replace existing caption files")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--extension", default=".txt", help="caption file extension (.txt or .caption)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.set_defaults(func=run)
