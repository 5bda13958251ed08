"""A short end-to-end smoke of the installed stack: tiny LoRA, TI and DreamBooth runs, exports loaded in diffusers.

Used by scripts/check_latest.sh on the newest package versions; prints one PASS/FAIL line per stage and
exits 1 if any failed. Runs through the CLI so it does not depend on dreamtune's internal layout.

    python scripts/smoke.py [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dreamtune(*args: str) -> None:
    """Run one dreamtune command; raise with its last output lines when it fails."""
    done = subprocess.run([sys.executable, "-m", "dreamtune.cli", *args], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-12:])
        raise RuntimeError(f"`dreamtune {' '.join(args[:3])} ...` exited {done.returncode}:\n{tail}")


def train(config: str, model: Path, out: Path, *extra: str) -> Path:
    dreamtune("train", "--config", str(REPO / "configs" / config), f"model.pretrained={model}", f"output.dir={out}",
              "data.resolution=32", "train.max_steps=2", "train.save_every=0", "validation.prompts=[]",
              "logging.report_to=[]", *extra)
    return out / "final"


def render(pipe) -> None:
    import numpy as np
    import torch

    image = pipe("a photo of sks toy", num_inference_steps=2, guidance_scale=1.0, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    if not np.isfinite(image).all():
        raise RuntimeError("the pipeline rendered NaN")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="dreamtune-smoke-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    model = work / "tiny-sd"
    results: dict[str, str] = {}

    def stage(name, fn):
        try:
            fn()
            results[name] = "PASS"
        except Exception as err:
            results[name] = "FAIL"
            print(f"--- {name} failed:\n{err if isinstance(err, RuntimeError) else traceback.format_exc()}")
        print(f"{results[name]} {name}", flush=True)

    def lora():
        from diffusers import StableDiffusionPipeline

        final = train("tiny_lora.yaml", model, work / "lora", "lora.train_text_encoder=true")
        for folder, weight_name in ((final.parent / "diffusers", "pytorch_lora_weights.safetensors"),
                                    (final, "sks_toy_lora.safetensors")):
            pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
            pipe.load_lora_weights(folder, weight_name=weight_name)
            render(pipe)

    def textual_inversion():
        from diffusers import StableDiffusionPipeline

        final = train("tiny_ti.yaml", model, work / "ti")
        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
        pipe.load_textual_inversion(final / "sks_toy_ti.safetensors", token="<sks>")
        render(pipe)

    def dreambooth():
        from diffusers import StableDiffusionPipeline

        final = train("tiny_dreambooth.yaml", model, work / "db", "dreambooth.prior_preservation=false")
        folder = final.parent / "diffusers"
        render(StableDiffusionPipeline.from_pretrained(folder, safety_checker=None))
        render(StableDiffusionPipeline.from_single_file(
            final / "sks_toy_db.safetensors", config=str(folder), safety_checker=None))

    stage("make-tiny-model", lambda: dreamtune("make-tiny-model", str(model)))
    for name, fn in (("lora (train, export, load both files)", lora),
                     ("textual_inversion (train, export, load A1111 file)", textual_inversion),
                     ("dreambooth (train, export, load folder and single file)", dreambooth)):
        stage(name, fn) if results["make-tiny-model"] == "PASS" else None
    failed = [n for n, r in results.items() if r == "FAIL"]
    print(f"smoke: {len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
