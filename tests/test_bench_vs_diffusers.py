"""scripts/bench_vs_diffusers.py: its timing, FLOP count and the commands it runs (the diffusers scripts
themselves need torchvision and their source, so the full comparison runs as a benchmark, not here)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_vs_diffusers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_diffusers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_rates_leave_out_warmup_and_count_cpu_time(bench):
    stamps = [(1, 0.0, 0.0), (2, 5.0, 1.0), (3, 6.0, 1.2), (4, 7.0, 1.4), (5, 8.0, 1.6)]
    steps_per_s, cpu_ms = bench.step_rates(stamps, warmup=2)
    assert steps_per_s == pytest.approx(1.0) and cpu_ms == pytest.approx(200.0)


def test_unet_flops_count_backward_and_the_trained_weights(bench, tiny_model_dir):
    lora = bench.unet_flops(tiny_model_dir, "lora", batch=1, resolution=64)
    full = bench.unet_flops(tiny_model_dir, "dreambooth", batch=1, resolution=64)
    assert 0 < lora < full  # weight gradients only where the base trains
    assert bench.unet_flops(tiny_model_dir, "lora", batch=2, resolution=64) == pytest.approx(2 * lora)


def test_both_sides_get_the_same_settings(bench, tmp_path):
    s = bench.settings("cpu")["dreambooth"]
    classes = tmp_path / "class"
    classes.mkdir()
    (classes / "a.png").touch()
    ours = bench.dreamtune_command("dreambooth", s, Path("m"), Path("d"), classes, Path("o"), 60, 64, caches=False)
    theirs = bench.diffusers_command("dreambooth", s, Path("ex"), Path("m"), Path("d"), classes, Path("o"), 60, 64)
    for key in ("train.max_steps=60", "train.batch_size=1", "data.resolution=64", "train.mixed_precision=no",
                "dreambooth.prior_preservation=true", "dreambooth.num_class_images=1", "dreambooth.ema=false",
                "data.cache_latents=none", "data.cache_text_embeddings=false"):
        assert key in ours
    def flag(name: str) -> str:
        return theirs[theirs.index(name) + 1]

    assert (flag("--max_train_steps"), flag("--train_batch_size"), flag("--resolution")) == ("60", "1", "64")
    assert flag("--mixed_precision") == "no" and flag("--num_class_images") == "1"
    assert "--with_prior_preservation" in theirs and "--use_8bit_adam" not in theirs
    cached = bench.dreamtune_command("dreambooth", s, Path("m"), Path("d"), classes, Path("o"), 60, 64, caches=True)
    assert not [arg for arg in cached if arg.startswith("data.cache_")]  # the defaults decide


def test_an_incomplete_examples_folder_is_named(tmp_path):
    (tmp_path / "train_dreambooth.py").write_text("")
    run = subprocess.run([sys.executable, str(SCRIPT), "--diffusers-examples", str(tmp_path), "--device", "cpu",
                          "--cases", "lora"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "missing train_dreambooth_lora.py, textual_inversion.py" in run.stderr
