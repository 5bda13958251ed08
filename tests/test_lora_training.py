"""LoRA end to end on the tiny model: what trains, what stays, and whether the exports reproduce it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dreamtune.training.loop import Trainer

from .conftest import render_32, tiny_run_config, saved_state


def lora_config(model_dir: Path, out: Path, *overrides: str):
    return tiny_run_config(
        "tiny_lora.yaml",
        model_dir,
        out,
        "train.max_steps=4",
        "train.learning_rate=5.0e-3",
        "train.lr_warmup_steps=0",
        "train.save_every=0",
        "validation.every=0",
        "validation.num_inference_steps=2",
        "validation.images_per_prompt=1",
        "validation.prompts=[a photo of sks toy]",
        "lora.alpha=16",  # alpha != rank: the exports must keep the scale
        *overrides,
    )


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One short LoRA run (UNet + text encoder adapters), kept for every test of this module."""
    cfg = lora_config(tiny_model_dir, tmp_path_factory.mktemp("lora-run"), "lora.train_text_encoder=true")
    trainer = Trainer(cfg)
    result = trainer.run()
    return trainer, result


def base_state(model_dir: Path, component: str) -> dict[str, torch.Tensor]:
    return saved_state(model_dir, component)


def test_run_finishes_with_finite_loss_and_files(trained):
    _, result = trained
    assert result.global_step == 4 and np.isfinite(result.last_loss)
    out = result.output_dir
    assert (out / "config.yaml").is_file() and (out / "README.md").is_file()
    assert (out / "samples" / "step-000004.png").is_file()
    assert [p.relative_to(out).as_posix() for p in result.exported] == [
        "final/sks_toy_lora.safetensors", "diffusers/pytorch_lora_weights.safetensors"]
    assert result.ui_file == out / "final" / "sks_toy_lora.safetensors"
    card = (out / "README.md").read_text()
    assert "<lora:sks_toy_lora:1>" in card and "a photo of sks toy" in card


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_base_weights_bitwise_unchanged(trained, tiny_model_dir, component):
    trainer, _ = trained
    module = getattr(trainer.models, component)
    live = {k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if "lora_" not in k}
    original = base_state(tiny_model_dir, component)
    assert set(live) == set(original)
    changed = [k for k, v in original.items() if not torch.equal(live[k].cpu(), v)]
    assert changed == []


def test_lora_weights_trained(trained):
    trainer, _ = trained
    for component in ("unet", "text_encoder"):
        ups = {n: p for n, p in getattr(trainer.models, component).named_parameters() if "lora_B" in n}
        assert ups, f"no LoRA layers on the {component}"
        # lora_B starts at zero; every adapter must have moved.
        assert all(p.detach().abs().sum() > 0 for p in ups.values())
        assert all(p.dtype == torch.float32 for p in ups.values())


def test_kohya_file_keys_and_metadata(trained):
    _, result = trained
    from safetensors import safe_open

    path = result.output_dir / "final" / "sks_toy_lora.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert alpha.dim() == 0 and float(alpha) == 16.0
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "16.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"


@pytest.fixture(scope="module")
def images(trained, tiny_model_dir):
    """The in-memory trained model's image, the base model's, and each export's loaded by diffusers."""
    from diffusers import StableDiffusionPipeline

    from dreamtune.models.pipeline import build_pipeline, inference_scheduler

    trainer, result = trained
    m = trainer.models
    for module in (m.unet, m.text_encoder):
        module.eval()
    trained_pipe = build_pipeline(m.tokenizer, m.text_encoder, m.vae, m.unet, inference_scheduler(m.noise_scheduler))
    out = {"trained": render_32(trained_pipe, "a photo of sks toy")}
    folders = {"diffusers": result.output_dir / "diffusers", "kohya": result.output_dir / "final"}
    for name, weight_name in [("base", None), ("diffusers", None), ("kohya", "sks_toy_lora.safetensors")]:
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
        pipe.scheduler = inference_scheduler(m.noise_scheduler)
        pipe.set_progress_bar_config(disable=True)
        if name != "base":
            pipe.load_lora_weights(str(folders[name]), weight_name=weight_name)
        out[name] = render_32(pipe, "a photo of sks toy")
    return out


@pytest.mark.parametrize("export", ["diffusers", "kohya"])
def test_export_reproduces_trained_model(images, export):
    np.testing.assert_allclose(images[export], images["trained"], atol=2e-3)


def test_trained_model_differs_from_base(images):
    assert np.abs(images["trained"] - images["base"]).max() > 1e-2


def test_bf16_mixed_precision_run_completes(tiny_model_dir, tmp_path):
    cfg = lora_config(tiny_model_dir, tmp_path, "train.mixed_precision=bf16", "train.max_steps=2",
                      "validation.prompts=[]")
    trainer = Trainer(cfg)
    result = trainer.run()
    assert result.global_step == 2 and np.isfinite(result.last_loss)
    lora = [p for n, p in trainer.models.unet.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora), "trainable weights must stay fp32"
    assert trainer.models.vae.dtype == torch.bfloat16


def test_bf16_trainable_weights_stay_fp32_through_validation_and_resume(tiny_model_dir, tmp_path, capsys):
    """Mixed precision upcasts the adapters once at setup; validation and a resume must not undo it."""
    dtypes = []

    def run(max_steps: int) -> Trainer:
        cfg = lora_config(tiny_model_dir, tmp_path, "train.mixed_precision=bf16", f"train.max_steps={max_steps}",
                          "train.save_every=2", "validation.every=1", "train.resume=auto")
        trainer = Trainer(cfg)
        validate = trainer.validate

        def spy_validate(step):
            path = validate(step)
            dtypes.append({p.dtype for module in trainer.method.trained_modules().values()
                           for p in module.parameters() if p.requires_grad})
            return path

        trainer.validate = spy_validate
        assert np.isfinite(trainer.run().last_loss)
        return trainer

    run(3)  # checkpoints at step 2
    resumed = run(4)  # resumes from step 2
    assert "at step 2" in capsys.readouterr().out
    assert len(dtypes) >= 4 and all(seen == {torch.float32} for seen in dtypes), dtypes
    assert resumed.models.vae.dtype == torch.bfloat16


def test_fp16_on_cpu_is_refused_with_the_fix(tiny_model_dir, tmp_path):
    cfg = lora_config(tiny_model_dir, tmp_path, "train.mixed_precision=fp16")
    with pytest.raises(ValueError, match="needs a GPU.*bf16"):
        Trainer(cfg).run()


def test_unknown_target_module_is_named(tiny_model_dir, tmp_path):
    cfg = lora_config(tiny_model_dir, tmp_path, "lora.target_modules=[to_qq]")
    with pytest.raises(ValueError, match=r"lora.target_modules: \['to_qq'\] match no layer"):
        Trainer(cfg).run()
