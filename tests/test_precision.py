"""model.vae_dtype and train.full_bf16: which dtype each model is placed in, and that such runs train."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamtune.config import load_config
from dreamtune.models.loading import load_base_model
from dreamtune.training.loop import Trainer
from dreamtune.training.precision import module_dtypes, place_models

from .conftest import tiny_run_config

NAMES = ["unet", "vae", "text_encoder"]


@pytest.mark.parametrize("overrides, expected", [
    ([], {"unet": torch.float32, "vae": torch.float16, "text_encoder": torch.float16}),
    (["model.vae_dtype=fp32"], {"unet": torch.float32, "vae": torch.float32, "text_encoder": torch.float16}),
])
def test_fp16_places_the_vae_in_fp32_when_asked(overrides, expected):
    cfg = load_config(None, ["trainer=lora", "train.mixed_precision=fp16", *overrides])
    assert module_dtypes(cfg, NAMES, {"unet"}) == expected


def test_fp16_models_with_an_fp32_vae(tiny_model_dir):
    """The placement itself (fp16 cannot train on the CPU, but modules can be cast there)."""
    cfg = load_config(None, ["trainer=lora", f"model.pretrained={tiny_model_dir}", "train.mixed_precision=fp16",
                             "model.vae_dtype=fp32"])
    models = load_base_model(cfg.model)
    assert place_models(cfg, models.components(), {"unet": models.unet}, "cpu") == torch.float16
    assert {p.dtype for p in models.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in models.text_encoder.parameters()} == {torch.float16}
    assert {p.dtype for p in models.unet.parameters()} == {torch.float32}


def test_full_bf16_trains_bf16_weights_with_an_fp32_vae(tiny_model_dir, tmp_path):
    cfg = tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, "train.mixed_precision=bf16",
                          "train.full_bf16=true", "model.vae_dtype=fp32", "train.max_steps=2", "train.save_every=0",
                          "validation.prompts=[a photo of sks toy]", "validation.num_inference_steps=1",
                          "validation.images_per_prompt=1")
    trainer = Trainer(cfg)
    result = trainer.run()
    assert np.isfinite(result.last_loss) and result.samples
    trained = [p for p in trainer.params]
    assert trained and {p.dtype for p in trained} == {torch.bfloat16}
    assert {p.dtype for p in trainer.models.vae.parameters()} == {torch.float32}
    state = trainer.optimizer.optimizer.state[trained[0]]
    assert state["exp_avg"].dtype == torch.bfloat16, "no fp32 copy: the optimizer state follows the weights"
