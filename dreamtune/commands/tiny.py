"""`dreamtune make-tiny-model`: a random SD 1.x model, offline: the tiny one the tests use, or SD 1.5-shaped."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from ..models.tiny import save_tiny_model

    out = save_tiny_model(args.out, seed=args.seed, architecture=args.architecture, dtype=args.dtype)
    shape = "tiny SD 1.x" if args.architecture == "tiny" else "SD 1.5-shaped"
    print(f"{shape} model (random weights, seed {args.seed}, {args.dtype}) written to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..models.tiny import ARCHITECTURES

    p = sub.add_parser(
        "make-tiny-model",
        help="build a random SD 1.x model (diffusers folder): tiny for tests, sd15 to measure memory and speed",
    )
    p.add_argument("out", help="output folder")
    p.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="tiny",
                   help="tiny (seconds, for tests) or sd15 (SD 1.5's shapes, about 4.3 GB in fp32)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="dtype of the saved weights")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
