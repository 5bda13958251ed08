"""Peak GPU memory and steps/s of the shipped SD 1.5 recipes on an SD 1.5-architecture model (random weights).

The model is built offline from the shipped SD 1.5 configs and CLIP tokenizer (`dreamtune make-tiny-model --architecture sd15`):
same shapes and layers as SD 1.5, so memory and speed are SD 1.5's, but it draws noise. Each case runs one
shipped recipe for a few steps at 512 px on rendered toy-world scenes, in its own child process so peaks do
not mix, and checks what mixed precision must keep true: trainable weights fp32, losses finite, weights moved.

    python scripts/bench_gpu.py                  # needs a CUDA GPU; about 5 min on an H100
    python scripts/bench_gpu.py --cases dreambooth --steps 30
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: case -> (shipped recipe, overrides). The DreamBooth case is the recipe as shipped: fp16, gradient
#: checkpointing, 8-bit AdamW, prior preservation, EMA on the CPU (its target: under 12 GB peak).
CASES = {
    "dreambooth": ("my_dog_dreambooth.yaml", ["dreambooth.num_class_images=4", "dreambooth.class_generation_steps=2"]),
    "dreambooth_adamw": ("my_dog_dreambooth.yaml", ["train.optimizer=adamw", "dreambooth.prior_preservation=false",
                                                    "dreambooth.ema=false"]),
    "dreambooth_bf16": ("my_dog_dreambooth.yaml", ["train.mixed_precision=bf16", "dreambooth.prior_preservation=false"]),
    "lora": ("pokemon_lora.yaml", ["data.dataset=null", "train.gradient_accumulation=1"]),
    "textual_inversion": ("my_concept_ti.yaml", ["train.gradient_accumulation=1"]),
}
#: Peak allocated targets (issue #28): DreamBooth under 10 GiB (11.75 measured before the caches were on by
#: default), LoRA under 5 GiB (6.32).
TARGETS_GIB = {"dreambooth": 10.0, "lora": 5.0}


def build_sd15_shaped(out: Path) -> Path:
    """Save an SD 1.5-architecture pipeline with random weights (fp32, safetensors) to ``out``.

    The same as ``dreamtune make-tiny-model OUT --architecture sd15``.
    """
    from dreamtune.models.tiny import save_tiny_model

    return save_tiny_model(out, architecture="sd15")


def write_images(folder: Path, resolution: int, count: int = 4) -> Path:
    """``count`` toy-world scenes rendered at ``resolution`` with captions."""
    import random

    from dreamtune.toyworld import world

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        scene = world.random_scene(rng)
        world.render(scene, resolution=resolution, jitter=rng).save(folder / f"scene_{i}.png")
        (folder / f"scene_{i}.txt").write_text(world.full_caption(scene) + "\n")
    return folder


def child(case: str, model: str, data: str, out: str, steps: int, resolution: int, precision: str | None) -> None:
    """Run one case and print its measurements as JSON on the last line."""
    import torch

    from dreamtune.config import load_config
    from dreamtune.training.loop import Trainer

    recipe, extra = CASES[case]
    overrides = [f"model.pretrained={model}", f"data.instance_dir={data}", f"output.dir={out}",
                 f"data.resolution={resolution}", f"train.max_steps={steps}", "train.save_every=0",
                 "train.resume=null", "validation.prompts=[]", "logging.report_to=[]", *extra]
    if precision:
        overrides.append(f"train.mixed_precision={precision}")
    trainer = Trainer(load_config(REPO / "configs" / recipe, overrides))
    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    trainer._setup()
    setup_s = time.perf_counter() - started
    trainer._setup = lambda: None
    params = trainer.params
    dtypes = sorted({str(p.dtype) for p in params})
    before = [p.detach().float().cpu().clone() for p in params[:4]]
    stamps, losses = [], []
    step_fn = trainer._train_step

    def timed_step(batch, micro_step):
        loss, scalars = step_fn(batch, micro_step)
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        losses.append(scalars["loss"])
        return loss, scalars

    trainer._train_step = timed_step
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    trainer.run()
    per_step = trainer.cfg.train.gradient_accumulation
    timed = stamps[2 * per_step:]  # the first two steps warm up kernels and the allocator
    steps_per_s = (len(timed) - 1) / per_step / (timed[-1] - timed[0]) if len(timed) > 1 else float("nan")
    moved = any(not torch.equal(b, p.detach().float().cpu()) for b, p in zip(before, params[:4]))
    print(json.dumps({
        "setup_s": setup_s, "steps_per_s": steps_per_s,
        "resident_gib": resident,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan"),
        "trainable_dtypes": dtypes, "trainable_params": sum(p.numel() for p in params),
        "losses_finite": all(math.isfinite(v) for v in losses), "weights_moved": moved,
        "mixed_precision": trainer.cfg.train.mixed_precision, "optimizer": trainer.cfg.train.optimizer,
        "gradient_checkpointing": trainer.cfg.train.gradient_checkpointing,
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--model", help="an existing diffusers folder instead of building the SD 1.5-shaped one")
    parser.add_argument("--mixed-precision", help="override every recipe's train.mixed_precision (e.g. no on a CPU)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=4, metavar=("CASE", "MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.steps, args.resolution, args.mixed_precision)
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(CASES)}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        model = Path(args.model) if args.model else build_sd15_shaped(Path(tmp) / "sd15-shaped")
        print(f"model ready in {time.perf_counter() - started:.0f} s: {model}", flush=True)
        data = write_images(Path(tmp) / "images", args.resolution)
        print("| case | precision | optimizer | grad ckpt | steps/s | peak allocated | peak reserved "
              "| trainable (dtype) | checks |\n|---|---|---|---|---|---|---|---|---|", flush=True)
        for case in cases:
            run = subprocess.run(
                [sys.executable, __file__, "--steps", str(args.steps), "--resolution", str(args.resolution),
                 *(["--mixed-precision", args.mixed_precision] if args.mixed_precision else []),
                 "--child", case, str(model), str(data), str(Path(tmp) / case)],
                capture_output=True, text=True)
            if run.returncode != 0:
                print(f"| {case} | failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode} |")
                results[case] = {"error": run.stderr[-4000:]}
                continue
            r = results[case] = json.loads(run.stdout.strip().splitlines()[-1])
            failed = [name for name, ok in (("fp32 weights", r["trainable_dtypes"] == ["torch.float32"]),
                                            ("finite loss", r["losses_finite"]), ("weights moved", r["weights_moved"]))
                      if not ok]
            checks = "ok" if not failed else "FAILED: " + ", ".join(failed)
            target = TARGETS_GIB.get(case)
            if target is not None and not math.isnan(r["peak_allocated_gib"]):  # NaN: no GPU ran it
                checks += f"; {'under' if r['peak_allocated_gib'] < target else 'OVER'} the {target:g} GiB target"
            dtypes = ", ".join(d.replace("torch.", "") for d in r["trainable_dtypes"])
            print(f"| {case} | {r['mixed_precision']} | {r['optimizer']} | {r['gradient_checkpointing']} | "
                  f"{r['steps_per_s']:.2f} | {r['peak_allocated_gib']:.2f} GiB | {r['peak_reserved_gib']:.2f} GiB | "
                  f"{r['trainable_params'] / 1e6:.2f} M ({dtypes}) | {checks} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
