"""export.every_save: each checkpoint carries the export files of its step, rotated with it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dreamtune.config import ConfigError
from dreamtune.training.loop import train

from .conftest import tiny_run_config

FAST = ("validation.prompts=[]", "train.learning_rate=1e-2", "lora.train_text_encoder=true")


def test_a_checkpoints_export_is_the_export_of_a_run_stopped_there(tiny_model_dir, tmp_path):
    train(tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path / "long", *FAST, "train.max_steps=4",
                          "train.save_every=2", "train.checkpoints_total_limit=1", "export.every_save=true"))
    short = train(tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path / "short", *FAST, "train.max_steps=2",
                                  "train.save_every=0"))
    kept = sorted((tmp_path / "long" / "checkpoints").glob("step-*"))
    assert [p.name for p in kept] == ["step-000002"]
    ui = kept[0] / "export" / "final" / "sks_toy_lora.safetensors"
    ours, theirs = load_file(str(ui)), load_file(str(short.ui_file))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (kept[0] / "export" / "diffusers" / "pytorch_lora_weights.safetensors").is_file()


def test_every_save_of_a_whole_model_needs_consent(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="export.every_save_full_model=true"):
        tiny_run_config("tiny_dreambooth.yaml", tiny_model_dir, tmp_path, "export.every_save=true")
    tiny_run_config("tiny_dreambooth.yaml", tiny_model_dir, tmp_path, "export.every_save=true",
                    "export.every_save_full_model=true")
