"""lora.init_from and textual_inversion.init_from: a run starts from an exported file's exact weights,
and a file for another rank, base or vector count is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dreamtune.config import ConfigError
from dreamtune.training.loop import Trainer, train
from dreamtune.weights.safetensors_io import save_safetensors

from .conftest import tiny_run_config

FAST = ("train.max_steps=3", "train.save_every=0", "validation.prompts=[]", "train.learning_rate=1e-2")


def lora_deltas(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Each adapter's weight change (scale x up @ down) by module path."""
    out = {}
    for part, module in trainer.method.trained_modules().items():
        for name, layer in module.named_modules():
            if hasattr(layer, "lora_A") and "default" in layer.lora_A:
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                out[f"{part}:{name}"] = (b @ a).detach() * layer.scaling["default"]
    return out


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-source")
    cfg = tiny_run_config("tiny_lora.yaml", tiny_model_dir, out, *FAST, "lora.train_text_encoder=true",
                          "lora.alpha=4")
    trainer = Trainer(cfg)
    result = trainer.run()
    return trainer, result.output_dir


def started_from(tiny_model_dir, tmp_path, file: Path, *overrides: str) -> Trainer:
    cfg = tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, *FAST, "lora.train_text_encoder=true",
                          f"lora.init_from={file}", *overrides)
    trainer = Trainer(cfg)
    trainer._setup()
    return trainer


def test_lora_starts_from_the_exported_change_whatever_its_alpha(lora_run, tiny_model_dir, tmp_path):
    source, run = lora_run
    trained = lora_deltas(source)
    assert trained and all(d.abs().max() > 0 for d in trained.values())
    # The diffusers file (fp32) at another alpha: the same change, to float rounding.
    started = lora_deltas(started_from(tiny_model_dir, tmp_path / "a",
                                       run / "diffusers" / "pytorch_lora_weights.safetensors", "lora.alpha=16"))
    assert started.keys() == trained.keys()
    for key in trained:
        torch.testing.assert_close(started[key], trained[key], atol=1e-6, rtol=1e-5, msg=key)
    # The kohya file (fp16 tensors): the same change to fp16 rounding.
    started = lora_deltas(started_from(tiny_model_dir, tmp_path / "b", run / "final" / "sks_toy_lora.safetensors"))
    for key in trained:
        torch.testing.assert_close(started[key], trained[key], atol=2e-3, rtol=2e-2, msg=key)


def test_lora_init_from_refuses_another_rank_base_or_part(lora_run, tiny_model_dir, tmp_path):
    _, run = lora_run
    kohya = run / "final" / "sks_toy_lora.safetensors"
    with pytest.raises(ConfigError, match=r"a different rank\. Set lora\.rank"):
        started_from(tiny_model_dir, tmp_path / "a", kohya, "lora.rank=4", "lora.text_encoder_rank=4")
    with pytest.raises(ConfigError, match=r"holds text_encoder module .*lora\.train_text_encoder=true"):
        started_from(tiny_model_dir, tmp_path / "b", kohya, "lora.train_text_encoder=false")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    wider = save_safetensors({f"{name}.lora_down.weight": torch.zeros(8, 77), f"{name}.lora_up.weight":
                              torch.zeros(77, 8), f"{name}.alpha": torch.tensor(8.0)}, tmp_path / "wider.safetensors")
    with pytest.raises(ConfigError, match=r"a different base model\. Train on the base"):
        started_from(tiny_model_dir, tmp_path / "c", Path(wider))
    with pytest.raises(ConfigError, match=r"lora.init_from: .*nope.safetensors is not a file"):
        tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, f"lora.init_from={tmp_path / 'nope.safetensors'}")


def test_textual_inversion_starts_from_the_exported_vectors(tiny_model_dir, tmp_path):
    first = tiny_run_config("tiny_ti.yaml", tiny_model_dir, tmp_path / "a", *FAST)
    trainer = Trainer(first)
    run = trainer.run().output_dir
    trained = trainer.method.learned_vectors(trainer.models.text_encoder)
    for file in ("diffusers/learned_embeds.safetensors", "final/sks_toy_ti.safetensors"):
        again = Trainer(tiny_run_config("tiny_ti.yaml", tiny_model_dir, tmp_path / file.replace("/", "-"), *FAST,
                                        f"textual_inversion.init_from={run / file}"))
        again._setup()
        assert torch.equal(again.method.learned_vectors(again.models.text_encoder), trained), file
    with pytest.raises(ConfigError, match=r"holds 2 vectors .* set textual_inversion.num_vectors=2"):
        train(tiny_run_config("tiny_ti.yaml", tiny_model_dir, tmp_path / "c", *FAST, "textual_inversion.num_vectors=3",
                              f"textual_inversion.init_from={run / 'diffusers' / 'learned_embeds.safetensors'}"))


def test_continuing_from_a_saved_steps_file_sees_what_a_resume_sees(tiny_model_dir, tmp_path):
    """lora.init_from + train.initial_step=N: step N+1 meets the same batch, noise, timesteps, weights and
    learning rate as a resume from checkpoint N, so its loss matches (a file holds no optimizer state, so the
    update after it may differ)."""
    common = ("train.learning_rate=1e-2", "validation.prompts=[]", "lora.train_text_encoder=true",
              "train.lr_scheduler=linear", "data.random_flip=true")
    straight = Trainer(tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path / "straight", *common,
                                       "train.max_steps=3", "train.save_every=2", "export.every_save=true"))
    expected = straight.run()
    saved = tmp_path / "straight" / "checkpoints" / "step-000002" / "export" / "diffusers" / "pytorch_lora_weights.safetensors"
    assert saved.is_file()

    continued = Trainer(tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path / "continued", *common,
                                        "train.max_steps=3", "train.save_every=0", f"lora.init_from={saved}",
                                        "train.initial_step=2"))
    result = continued.run()
    assert result.global_step == 3
    torch.testing.assert_close(result.last_loss, expected.last_loss, rtol=1e-5, atol=1e-7)
    assert continued.lr_scheduler.get_last_lr() == straight.lr_scheduler.get_last_lr()

    fresh = train(tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path / "fresh", *common, "train.max_steps=1",
                                  "train.save_every=0", f"lora.init_from={saved}"))
    assert abs(fresh.last_loss - expected.last_loss) > 1e-4  # step 1's batch and noise: initial_step is what matched


def test_with_a_stateless_optimizer_continuing_from_the_file_equals_continuing_from_the_checkpoint(
        tiny_model_dir, tmp_path):
    """Plain SGD keeps no state, so the file plus train.initial_step holds everything a resume restores."""
    common = ("train.learning_rate=1e-1", "validation.prompts=[]", "lora.train_text_encoder=true",
              "train.optimizer=torch.optim.SGD", "train.max_steps=3")
    straight = Trainer(tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path / "straight", *common,
                                       "train.save_every=2", "export.every_save=true"))
    straight.run()
    saved = tmp_path / "straight" / "checkpoints" / "step-000002" / "export" / "diffusers" / "pytorch_lora_weights.safetensors"
    continued = Trainer(tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path / "continued", *common,
                                        "train.save_every=0", f"lora.init_from={saved}", "train.initial_step=2"))
    continued.run()
    expected, got = lora_deltas(straight), lora_deltas(continued)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)
    at_step_2 = lora_deltas(started_from(tiny_model_dir, tmp_path / "start", saved))
    assert any(not torch.allclose(at_step_2[k], expected[k], atol=1e-5) for k in expected)  # step 3 moved them


def test_initial_step_past_the_end_is_refused(tiny_model_dir, tmp_path):
    cfg = tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, *FAST, "train.initial_step=3")
    with pytest.raises(ConfigError, match=r"train.initial_step=3 leaves nothing to train.*train.max_steps"):
        train(cfg)
