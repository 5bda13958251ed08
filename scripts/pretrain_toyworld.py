"""Pretrain the toy-world base model and its classifier from scratch (2 CPU cores: about 50 minutes).

    python scripts/pretrain_toyworld.py --out dreamtune/toyworld/assets --seed 0
    python scripts/pretrain_toyworld.py --out runs/toyworld --device cuda   # same data, other arithmetic: other weights
    python scripts/pretrain_toyworld.py --classifier-only   # retrain the judge on the committed VAE (~10 min)

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
    parser.add_argument("--out", default=str(REPO / "dreamtune" / "toyworld" / "assets"),
                        help="folder for model/, classifier/ and pretrain_report.json (default: the shipped ones)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--unet-steps", type=int, default=None, help="override the recipe's denoiser steps")
    parser.add_argument("--device", default="cpu", help="cpu (what the committed weights came from) or cuda")
    parser.add_argument("--classifier-only", action="store_true",
                        help="train only the classifier, on <out>'s model, and re-judge it (the seed is <out>'s)")
    args = parser.parse_args()

    import torch

    from dreamtune.toyworld.pretrain import pretrain, retrain_judge

    torch.set_num_threads(args.threads)
    overrides = {"unet_steps": args.unet_steps} if args.unet_steps else {}
    started = time.time()
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.classifier_only:
        report = retrain_judge(args.out, log=log, device=args.device)
    else:
        report = pretrain(args.out, seed=args.seed, overrides=overrides, log=log, device=args.device)
    quality = report["held_out_quality"]
    print(f"done in {(time.time() - started) / 60:.1f} min; held-out shape+colour accuracy "
          f"{quality['both']:.1%} (bar: 90%), position {quality['position']:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
