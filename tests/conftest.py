"""Shared fixtures: the tiny model is built once per session; nothing touches the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The tiny models are too small for intra-op threads to pay off; on a 2-core CI box two threads
# per op mostly contend (measured ~4x slower pipeline calls).
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny SD 1.x diffusers folder with random weights (seed 0), built once."""
    from dreamtune.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


def tiny_run_config(recipe: str, model_dir: Path, out: Path, *overrides: str):
    """A shipped config pointed at the tiny test model and the shipped images, at 32 px, trackers off."""
    from dreamtune.config import load_config

    return load_config(
        REPO_ROOT / "configs" / recipe,
        [
            f"model.pretrained={model_dir}",
            f"output.dir={out}",
            f"data.instance_dir={REPO_ROOT / 'examples' / 'sks_toy'}",
            "data.resolution=32",
            "logging.report_to=[]",
            *overrides,
        ],
    )


def saved_state(model_dir: Path, component: str) -> dict[str, torch.Tensor]:
    """A saved component's tensors, text-encoder keys as transformers 5 names them in memory.

    Diffusers folders we write hold the hub's ``text_model.`` layout (what other readers need).
    """
    from safetensors.torch import load_file

    name = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(Path(model_dir) / component / name))
    return {k.removeprefix("text_model.") if component == "text_encoder" else k: v for k, v in tensors.items()}


def render_32(pipe, prompt: str):
    """One 32 px image as a numpy array: seed 0, 2 steps, no guidance, so runs compare exactly."""
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, guidance_scale=1.0, height=32, width=32,
                generator=generator, output_type="np").images[0]
