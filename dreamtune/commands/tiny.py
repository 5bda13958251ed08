"""`dreamtune make-tiny-model`: the tiny random SD 1.x model used by the tests."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from ..models.tiny import save_tiny_model

    out = save_tiny_model(args.out, seed=args.seed)
    print(f"tiny SD 1.x model (random weights, seed {args.seed}) written to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-model", help="build the tiny random SD 1.x model (diffusers folder)")
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
