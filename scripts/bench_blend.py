"""Benchmark `dreamtune blend` on two synthetic SD 1.5-shaped fp16 single-file checkpoints (~2 GB each).

Key names and shapes come from the shipped SD 1.5 configs through the single-file key maps; values are
random. Each blend runs in a child process (the `dreamtune` CLI); its peak RSS (ru_maxrss from wait4)
and wall time are printed. Everything is written to a temp dir that is removed at the end.

    python scripts/bench_blend.py [--tmp-dir DIR] [--keep-hash-run]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from dreamtune.weights.diffusers_folder import SD1_CONFIG_DIR, read_config
from dreamtune.weights.ldm_keys import TEXT_MODEL_PREFIX, unet_key_map, vae_key_map


def sd15_shapes() -> dict[str, tuple[int, ...]]:
    """Single-file key -> shape of SD 1.5 (UNet, VAE with 1x1-conv attention, CLIP ViT-L text encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    shapes: dict[str, tuple[int, ...]] = {}
    for key_map in (unet_key_map(read_config(SD1_CONFIG_DIR, "unet")),
                    vae_key_map(read_config(SD1_CONFIG_DIR, "vae"))):
        for key, shape in key_map.shapes.items():
            extra = (1, 1) if key in key_map.conv1x1 else ()
            shapes[key_map.to_single[key]] = (*shape, *extra)
    config = CLIPTextConfig.from_dict(read_config(SD1_CONFIG_DIR, "text_encoder"))
    with torch.device("meta"):
        text = CLIPTextModel(config).state_dict()
    for key, tensor in text.items():
        rest = key.removeprefix("text_model.")
        if rest != "embeddings.position_ids":
            shapes[TEXT_MODEL_PREFIX + rest] = tuple(tensor.shape)
    return shapes


def write_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    """Random fp16 tensors (std 0.02) under the SD 1.5 names, saved as one .safetensors file."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: (torch.randn(s, generator=generator) * 0.02).half() for k, s in shapes.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def measure(argv: list[str]) -> tuple[float, float]:
    """Run a child process; return (wall seconds, peak RSS in GiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(argv)}")
    return wall, usage.ru_maxrss / 2**20  # Linux: KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tmp-dir", help="where to put the ~6 GB of temp files (default: system temp)")
    parser.add_argument("--with-hash", action="store_true", help="also time a run that hashes the inputs")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dreamtune-bench-", dir=args.tmp_dir))
    try:
        shapes = sd15_shapes()
        params = sum(torch.Size(s).numel() for s in shapes.values())
        paths = [tmp / "a.safetensors", tmp / "b.safetensors"]
        for seed, path in enumerate(paths):
            write_checkpoint(path, shapes, seed)
        size = paths[0].stat().st_size / 2**30
        print(f"inputs: 2 x {size:.2f} GiB fp16, {len(shapes)} tensors, {params / 1e9:.3f} B parameters")
        cli = [sys.executable, "-m", "dreamtune.cli", "blend", *map(str, paths), "--alpha", "0.5",
               "--out", str(tmp / "out.safetensors")]
        runs = [("blend --alpha 0.5 --no-hash", cli + ["--no-hash"])]
        if args.with_hash:
            runs.append(("blend --alpha 0.5 (inputs sha256)", cli))
        for label, argv in runs:
            wall, rss = measure(argv)
            print(f"{label}: wall {wall:.1f} s, peak RSS {rss:.2f} GiB (output {size:.2f} GiB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
