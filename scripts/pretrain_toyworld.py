"""Pretrain the toy-world base model and its classifier from scratch (2 CPU cores: about 50 minutes).

    python scripts/pretrain_toyworld.py --out examples/toyworld --seed 0
    python scripts/pretrain_toyworld.py --out runs/toyworld --device cuda   # same data, other arithmetic: other weights

Writes <out>/model (SD 1.x diffusers folder, safetensors), <out>/classifier and
<out>/pretrain_report.json (timings, classifier accuracy, held-out prompt quality).
"""

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "examples" / "toyworld"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--unet-steps", type=int, default=None, help="override the recipe's denoiser steps")
    parser.add_argument("--device", default="cpu", help="cpu (what the committed weights came from) or cuda")
    args = parser.parse_args()

    import torch

    from dreamtune.toyworld.pretrain import pretrain

    torch.set_num_threads(args.threads)
    overrides = {"unet_steps": args.unet_steps} if args.unet_steps else {}
    started = time.time()
    report = pretrain(args.out, seed=args.seed, overrides=overrides, log=lambda m: print(m, flush=True),
                      device=args.device)
    quality = report["held_out_quality"]
    print(f"done in {(time.time() - started) / 60:.1f} min; held-out shape+colour accuracy "
          f"{quality['both']:.1%} (bar: 90%), position {quality['position']:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
