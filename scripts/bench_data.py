"""Data-layer speed: scan cost, loader images/s with workers, and tiny-model steps/s with/without the caches.

    python scripts/bench_data.py [--images 200] [--steps 40] [--training-only]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def write_jpegs(folder: Path, count: int) -> None:
    """``count`` 512px JPEGs (mixed aspect) with .txt captions."""
    import numpy as np
    from PIL import Image

    rng = random.Random(0)
    sizes = [(512, 512), (640, 512), (512, 640), (768, 512)]
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        base = np.random.default_rng(i).integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
        image.save(folder / f"{i:04d}.jpg", quality=90)
        (folder / f"{i:04d}.txt").write_text(f"photo {i}, tag{rng.randint(0, 9)}", encoding="utf-8")


class TimedIterator:
    """Wraps a loader iterator and adds up the time spent waiting in ``next()``."""

    blocked = 0.0
    batches = 0

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.inner)
        finally:
            TimedIterator.blocked += time.perf_counter() - start
            TimedIterator.batches += 1


def bench_loader(folder: Path, workers: int, batch_size: int, bucketing: bool) -> dict:
    from dreamtune.data.config import DataConfig
    from dreamtune.data.dataset import build_dataset
    from dreamtune.data.loader import build_train_loader

    cfg = DataConfig(instance_dir=str(folder), resolution=512, num_workers=workers, random_flip=True,
                     bucketing=bucketing)
    start = time.perf_counter()
    dataset = build_dataset(cfg, seed=0)
    scan = time.perf_counter() - start
    loader = build_train_loader(cfg, batch_size=batch_size, seed=0, dataset=dataset)
    loader.set_epoch(0)
    start, images = time.perf_counter(), 0
    for batch in loader:
        images += len(batch["captions"])
    elapsed = time.perf_counter() - start
    return {"scan_s": scan, "images": images, "images_per_s": images / elapsed}


def bench_training(folder: Path, model_dir: Path, out: Path, cache: str, text_cache: bool, steps: int,
                   workers: int) -> dict:
    from dreamtune.data import loader as data_loader
    from dreamtune.training import loop
    from dreamtune.config import load_config

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "tiny_lora.yaml", [
        f"model.pretrained={model_dir}", f"output.dir={out}", f"data.instance_dir={folder}",
        "data.resolution=64", f"data.num_workers={workers}", f"data.cache_latents={cache}",
        f"data.cache_dir={out / 'cache'}", f"data.cache_text_embeddings={str(text_cache).lower()}",
        f"train.max_steps={steps}", "train.batch_size=2",
        "train.save_every=0", "validation.every=0", "validation.prompts=[]", "logging.report_to=[]",
    ])
    stamps: list[tuple[float, float]] = []  # (wall, this process's CPU time) at each step's start
    original_step = loop.Trainer._train_step
    original_iter = data_loader.TrainLoader.__iter__

    def timed_step(self, *args, **kwargs):
        stamps.append((time.perf_counter(), time.process_time()))
        return original_step(self, *args, **kwargs)

    loop.Trainer._train_step = timed_step
    data_loader.TrainLoader.__iter__ = lambda self: TimedIterator(original_iter(self))
    TimedIterator.blocked, TimedIterator.batches = 0.0, 0
    try:
        start = time.perf_counter()
        loop.Trainer(cfg).run()
        total = time.perf_counter() - start
    finally:
        loop.Trainer._train_step = original_step
        data_loader.TrainLoader.__iter__ = original_iter
    warm = stamps[5:]  # after the first batches (worker start-up)
    return {
        "steps_per_s": (len(warm) - 1) / (warm[-1][0] - warm[0][0]), "run_s": total,
        # CPU time of the training process per step: what a step costs, less sensitive than wall time to
        # other jobs on a shared machine (the loader workers' CPU time is not in it).
        "cpu_ms_per_step": 1000 * (warm[-1][1] - warm[0][1]) / (len(warm) - 1),
        # The fastest step: the least disturbed by other jobs, so closest to what a step costs.
        "best_ms_per_step": 1000 * min(b[0] - a[0] for a, b in zip(warm, warm[1:])),
        "blocked_ms_per_batch": 1000 * TimedIterator.blocked / max(1, TimedIterator.batches),
    }


def bench_encoders(model_dir: Path, batch: int = 2, resolution: int = 64, repeats: int = 30) -> dict:
    """Fastest-of-N ms for what the two caches skip each step: the VAE encode and the text-encoder forward."""
    import torch

    from dreamtune.config import ModelConfig
    from dreamtune.models.loading import load_base_model

    m = load_base_model(ModelConfig(pretrained=str(model_dir)))
    pixels = torch.randn(batch, 3, resolution, resolution)
    ids = m.tokenizer(["a photo of sks toy"] * batch, padding="max_length", max_length=m.tokenizer.model_max_length,
                      return_tensors="pt").input_ids

    def best_ms(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1000 * min(times)

    with torch.no_grad():
        return {"vae_ms": best_ms(lambda: m.vae.encode(pixels)), "text_ms": best_ms(lambda: m.text_encoder(ids))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--training-only", action="store_true", help="skip the loader measurements")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    from dreamtune.models.tiny import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "photos"
        folder.mkdir()
        write_jpegs(folder, args.images)
        for workers, bucketing in () if args.training_only else ((0, False), (2, False), (2, True)):
            r = bench_loader(folder, workers, batch_size=4, bucketing=bucketing)
            print(f"loader workers={workers} bucketing={bucketing}: {r['images_per_s']:.1f} images/s at 512px "
                  f"({r['images']} images); scan with full decode {r['scan_s']:.2f}s "
                  f"({1000 * r['scan_s'] / args.images:.1f} ms/image)")
        model_dir = save_tiny_model(tmp / "tiny", seed=0)
        torch.set_num_threads(1)  # one compute thread: CPU time per step then counts no spin-waiting
        r = bench_encoders(model_dir)
        print(f"tiny-model encoders (batch 2, 64px, fastest of 30): VAE encode {r['vae_ms']:.1f} ms, "
              f"text encoder {r['text_ms']:.1f} ms")
        for cache, text_cache in (("none", False), ("memory", False), ("none", True), ("memory", True)):
            r = bench_training(folder, model_dir, tmp / f"run-{cache}-{text_cache}", cache, text_cache, args.steps,
                               workers=2)
            print(f"tiny-model training cache_latents={cache} cache_text_embeddings={str(text_cache).lower()}: "
                  f"{r['steps_per_s']:.2f} steps/s, {r['cpu_ms_per_step']:.0f} CPU ms/step, fastest step "
                  f"{r['best_ms_per_step']:.0f} ms (batch 2, 64px), blocked on next() "
                  f"{r['blocked_ms_per_batch']:.1f} ms/batch, whole run with setup {r['run_s']:.1f}s")


if __name__ == "__main__":
    main()
