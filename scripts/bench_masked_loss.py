"""Masked loss on the toy world: does a mask on the subject keep a background distractor out of the learned word?

Four training images show the concept (the red heart, captioned "{token}" as in the toy-world benchmark) beside a
distractor no caption names: a green circle in the top-left corner. Each seed trains the toy-world LoRA recipe
twice, unmasked and with data.masked_loss (a mask on the heart only, data.unmasked_weight 0), then draws
``--samples`` images of "a photo of sks" and counts those showing a distractor: at least ``MIN_PIXELS`` coloured
pixels whose strongest channel is green or blue. No background is coloured, and the heart (red, with pink, orange or
brown edges and tints) always has red strongest, so such pixels are a second shape; the toy model often draws the
leaked circle in another colour (pale blue, purple), so the test is "not red-family", not "green". The toy-world judge reports
concept fidelity (a red heart) on the same images, so a mask that kept the distractor out by teaching nothing would
show.

    python scripts/bench_masked_loss.py [--seeds 0,1,2] [--samples 64] [--steps 400] [--out outputs/bench-masked]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from dreamtune.toyworld import benchmark, world  # noqa: E402

BIG = world.RESOLUTION * world.SUPERSAMPLE
#: The distractor: a green circle of this radius (share of the side) centred in the top-left corner.
DISTRACTOR = {"color": world.COLORS["green"], "center": (0.17, 0.17), "radius": 0.14}
#: A sample shows a distractor when it has at least this many such pixels (the circle covers ~65 of 1024).
MIN_PIXELS = 8
MODES = {"unmasked": [], "masked": ["data.masked_loss=true"]}


def distractor_pixels(image: Image.Image) -> int:
    """Coloured pixels (channel spread > 30) whose strongest channel is not red: a shape other than the concept."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int32)
    coloured = rgb.max(axis=-1) - rgb.min(axis=-1) > 30
    return int((coloured & (np.maximum(rgb[..., 1], rgb[..., 2]) > rgb[..., 0])).sum())


def shows_distractor(image: Image.Image) -> bool:
    return distractor_pixels(image) >= MIN_PIXELS


def render_pair(scene: world.Scene, seed: int) -> tuple[Image.Image, Image.Image]:
    """The concept scene with the distractor drawn in, and the concept's mask (the heart alone, white on black)."""
    big = world.render(scene, resolution=BIG, jitter=random.Random(seed))
    ImageDraw.Draw(big).ellipse(circle_box(BIG), fill=DISTRACTOR["color"])
    alone = world.render(world.Scene(scene.shape, "red", scene.size, scene.position, "black"), resolution=BIG,
                         jitter=random.Random(seed))
    mask = Image.fromarray((np.asarray(alone)[..., 0] > 110).astype(np.uint8) * 255)
    shrink = (world.RESOLUTION, world.RESOLUTION)
    return big.resize(shrink, Image.Resampling.BOX), mask.resize(shrink, Image.Resampling.BOX)


def circle_box(side: int) -> tuple[float, float, float, float]:
    (cx, cy), r = DISTRACTOR["center"], DISTRACTOR["radius"]
    return ((cx - r) * side, (cy - r) * side, (cx + r) * side, (cy + r) * side)


def write_data(folder: Path) -> tuple[Path, Path]:
    """The training images (captions as the toy-world benchmark's) and their masks, in two folders."""
    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(benchmark.CONCEPT_SCENES):
        image, mask = render_pair(scene, i)
        assert shows_distractor(image), "the detector must see the distractor in every training image"
        for background in world.BACKGROUNDS:  # and nothing in the concept alone, on any background
            alone = world.render(world.Scene(scene.shape, "red", scene.size, scene.position, background),
                                 jitter=random.Random(i))
            assert not shows_distractor(alone), f"the detector mistakes the concept on {background} for a distractor"
        image.save(images / f"heart_{i}.png")
        mask.save(masks / f"heart_{i}.png")
        (images / f"heart_{i}.txt").write_text(world.full_caption(scene, "{token}", color=False) + "\n")
    return images, masks


def train_and_sample(mode: str, seed: int, images: Path, masks: Path, out: Path, steps: int, samples: int,
                     judge, unmasked_weight: float = 0.0) -> dict:
    """One LoRA run with the toy-world recipe, then the distractor rate and concept fidelity of its samples."""
    from dreamtune.config import load_config
    from dreamtune.toyworld.generate import generate, score
    from dreamtune.toyworld.paths import MODEL_DIR, find_recipes
    from dreamtune.training.loop import train

    extra = [f"data.mask_dir={masks}", f"data.unmasked_weight={unmasked_weight}"] if mode == "masked" else []
    cfg = load_config(find_recipes()["lora"], [
        f"model.pretrained={MODEL_DIR}", f"data.instance_dir={images}", f"output.dir={out}", f"train.seed={seed}",
        f"train.max_steps={steps}", "train.save_every=0", "validation.prompts=[]", "logging.report_to=[]",
        *MODES[mode], *extra])
    started = time.time()
    train(cfg)
    seconds = time.time() - started
    pipe = benchmark.load_export("lora", MODEL_DIR, out / "final")
    prompt = benchmark.CONCEPT_PROMPT.format(t=benchmark.TOKEN)
    drawn = generate(pipe, [prompt] * samples, seed, **benchmark.GENERATION)
    benchmark.save_sample_grid(drawn, samples, out / "samples.png")
    (out / "samples").mkdir(exist_ok=True)
    for i, image in enumerate(drawn):
        image.save(out / "samples" / f"{i:03d}.png")
    concept = score(judge.predict(drawn), [benchmark.SUBJECT] * samples)["both"]
    return {"distractor_rate": sum(map(shows_distractor, drawn)) / samples,
            "concept_fidelity": concept, "train_seconds": round(seconds, 1)}


def table(rows: dict[int, dict[str, dict]]) -> str:
    lines = ["| seed | distractor rate, unmasked | distractor rate, masked | concept fidelity, unmasked | "
             "concept fidelity, masked | train s (unmasked / masked) |", "|---|---|---|---|---|---|"]
    for seed, row in rows.items():
        u, m = row["unmasked"], row["masked"]
        lines.append(f"| {seed} | {u['distractor_rate']:.2f} | {m['distractor_rate']:.2f} | "
                     f"{u['concept_fidelity']:.2f} | {m['concept_fidelity']:.2f} | "
                     f"{u['train_seconds']:.0f} / {m['train_seconds']:.0f} |")
    mean = {mode: {k: float(np.mean([row[mode][k] for row in rows.values()])) for k in ("distractor_rate",
                                                                                       "concept_fidelity")}
            for mode in MODES}
    lines.append(f"| mean | {mean['unmasked']['distractor_rate']:.2f} | {mean['masked']['distractor_rate']:.2f} | "
                 f"{mean['unmasked']['concept_fidelity']:.2f} | {mean['masked']['concept_fidelity']:.2f} | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=400, help="training steps per run (the recipe's 400)")
    parser.add_argument("--out", default=None, help="keep runs, sample grids and results.json here")
    parser.add_argument("--unmasked-weight", type=float, default=0.0, help="data.unmasked_weight of the masked runs")
    args = parser.parse_args()

    import torch

    from dreamtune.toyworld.classifier import load_classifier
    from dreamtune.toyworld.generate import generate
    from dreamtune.toyworld.paths import CLASSIFIER_DIR, MODEL_DIR

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    judge = load_classifier(CLASSIFIER_DIR)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-masked-"))
    images, masks = write_data(out / "data")
    prompt = benchmark.CONCEPT_PROMPT.format(t=benchmark.TOKEN)
    drawn = generate(benchmark.load_base(MODEL_DIR), [prompt] * args.samples, 0, **benchmark.GENERATION)
    print(f"base model: distractor rate {sum(map(shows_distractor, drawn)) / args.samples:.2f}", flush=True)
    rows: dict[int, dict[str, dict]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        rows[seed] = {}
        for mode in MODES:
            rows[seed][mode] = train_and_sample(mode, seed, images, masks, out / f"seed-{seed}" / mode, args.steps,
                                                args.samples, judge, args.unmasked_weight)
            print(f"seed {seed} {mode}: {rows[seed][mode]}", flush=True)
            (out / "results.json").write_text(json.dumps({"steps": args.steps, "samples": args.samples,
                                                          "unmasked_weight": args.unmasked_weight,
                                                          "rows": rows}, indent=2) + "\n")
    print(table(rows))
    print(f"runs, sample grids and results.json in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
