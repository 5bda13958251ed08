"""`dreamtune train`: the same as `accelerate launch train.py --config FILE [key=value ...]`."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from ..config import load_config
    from ..training.loop import train

    result = train(load_config(args.config, args.overrides))
    if PartialState().is_main_process and not result.interrupted:
        print(f"\ndone: {result.global_step} steps, last loss {result.last_loss:.4f}")
        if result.ui_file is not None:
            print(f"  for UIs     {result.ui_file}  (A1111/Forge, ComfyUI, InvokeAI: load this file)")
        for path in result.exported:
            if path != result.ui_file:
                print(f"  exported    {path}")
        for path in result.samples[-1:]:
            print(f"  sample grid {path}")
        print(f"  model card  {result.output_dir / 'README.md'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train with a YAML config (same as `accelerate launch train.py`)")
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=800")
    p.set_defaults(func=run)
