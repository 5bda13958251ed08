"""Exports other tools load (issue #23): final/ holds only the UI file, diffusers folders keep the hub's text-encoder
keys, a half-precision base trains, and `inspect`, the model card and the end-of-run summary name the UI file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dreamtune.training.loop import Trainer

from .conftest import REPO_ROOT, tiny_run_config

SHORT = ("train.max_steps=1", "train.save_every=0", "validation.prompts=[]")
#: trainer -> (recipe, overrides, its UI file's name, files expected outside final/)
CASES = {
    "lora": ("tiny_lora.yaml", ["lora.train_text_encoder=true"], "sks_toy_lora.safetensors",
             ["diffusers/pytorch_lora_weights.safetensors"]),
    "textual_inversion": ("tiny_ti.yaml", ["textual_inversion.export_pt=true"], "sks_toy_ti.safetensors",
                          ["diffusers/learned_embeds.safetensors", "variants/sks_toy_ti.pt"]),
    "dreambooth": ("tiny_dreambooth.yaml", ["dreambooth.prior_preservation=false", "export.blend_alpha=[0.5]"],
                   "sks_toy_db.safetensors",
                   ["diffusers/model_index.json", "variants/sks_toy_db-blend-0.50.safetensors",
                    "variants/sks_toy_db-raw.safetensors"]),
}


def weight_files(folder: Path) -> list[str]:
    """What InvokeAI counts in a folder: weight files at any depth."""
    suffixes = {".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".gguf"}
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix in suffixes)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    """The tiny model as transformers 5 saves a text encoder it built (as from a single file): no text_model. level."""
    from dreamtune.models.tiny import build_tiny_pipeline

    out = tmp_path_factory.mktemp("plain") / "model"
    build_tiny_pipeline(seed=0).save_pretrained(out)
    with safe_open(str(out / "text_encoder" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("text_model.") for k in f.keys())
    return out


@pytest.fixture(scope="module")
def runs(plain_model, tmp_path_factory):
    """One short run per trainer, through `dreamtune train` (the end-of-run summary is part of what is checked)."""
    from dreamtune.cli import main

    tiny_model_dir = plain_model
    out = {}
    for trainer, (recipe, overrides, _, _) in CASES.items():
        run = tmp_path_factory.mktemp(trainer)
        overrides = [f"model.pretrained={tiny_model_dir}", f"output.dir={run}", "data.resolution=32",
                     f"data.instance_dir={REPO_ROOT / 'examples' / 'sks_toy'}", "logging.report_to=[]", *SHORT,
                     *overrides]
        with pytest.MonkeyPatch.context() as mp:
            printed: list[str] = []
            mp.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
            assert main(["train", "--config", str(REPO_ROOT / "configs" / recipe), *overrides]) == 0
        out[trainer] = run, "\n".join(printed)
    return out


@pytest.mark.parametrize("trainer", list(CASES))
def test_final_holds_only_the_ui_file(runs, trainer):
    run, printed = runs[trainer]
    _, _, ui_name, others = CASES[trainer]
    assert weight_files(run / "final") == [ui_name]
    assert sorted(p.relative_to(run).as_posix() for p in run.glob("*/*") if p.parent.name in ("diffusers", "variants")
                  and p.relative_to(run).as_posix() in others) == sorted(others)
    assert f"for UIs     {run / 'final' / ui_name}" in printed
    card = (run / "README.md").read_text()
    assert f"- For UIs (AUTOMATIC1111/Forge, ComfyUI, InvokeAI): `final/{ui_name}`" in card
    assert f"`final/{ui_name}` (the file for UIs)" in card


@pytest.mark.parametrize("trainer", list(CASES))
def test_inspect_says_the_ui_file_loads_in_every_ui(runs, trainer):
    from dreamtune.weights.describe import describe

    run, _ = runs[trainer]
    verdicts = describe(run / "final" / CASES[trainer][2])["loads_in"]
    assert verdicts["AUTOMATIC1111/Forge"] == "yes" and verdicts["ComfyUI"] == "yes"
    assert verdicts["diffusers"].startswith("yes")
    if trainer != "dreambooth":  # the tiny model's text is 32 wide, which InvokeAI files under no base
        assert verdicts["InvokeAI"].startswith("no:") and "32 wide" in verdicts["InvokeAI"]


def test_inspect_says_the_peft_lora_file_is_for_diffusers_only(runs, capsys):
    from dreamtune.cli import main

    run, _ = runs["lora"]
    assert main(["inspect", str(run / "diffusers" / "pytorch_lora_weights.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "loads in:" in out and "    diffusers: yes" in out
    assert "ComfyUI: partly: applies only the text_encoder.* keys" in out
    assert "InvokeAI: no: the PEFT layout is not recognised" in out


def test_dreambooth_folder_text_encoder_has_the_hub_keys(runs):
    """SD 1.5's layout (text_model.*), which ComfyUI and transformers < 5 read; transformers 5 loads it back whole."""
    from transformers import CLIPTextModel

    from dreamtune.weights.describe import describe

    folder = runs["dreambooth"][0] / "diffusers"
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)
    assert {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
            "text_model.final_layer_norm.weight", "text_model.encoder.layers.0.self_attn.q_proj.weight"} <= set(keys)
    model, info = CLIPTextModel.from_pretrained(folder / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    verdicts = describe(folder)["loads_in"]
    assert verdicts["ComfyUI"].startswith("yes") and verdicts["InvokeAI"].startswith("yes")


def test_inspect_flags_a_folder_saved_in_transformers_5_layout(plain_model):
    from dreamtune.weights.describe import describe

    verdicts = describe(plain_model)["loads_in"]
    assert verdicts["diffusers"] == "yes"
    assert verdicts["ComfyUI"].startswith("no: text encoder keys lack 'text_model.'")


@pytest.fixture(scope="module")
def fp16_model(tiny_model_dir, tmp_path_factory):
    """The tiny model as many local copies are: fp16 weights saved as diffusers' fp16 variant."""
    from diffusers import StableDiffusionPipeline

    from dreamtune.weights.diffusers_folder import save_pipeline_folder

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float16)
    out = tmp_path_factory.mktemp("fp16") / "model"
    pipe.save_pretrained(out, variant="fp16")
    assert (out / "text_encoder" / "model.fp16.safetensors").is_file()
    return out


@pytest.mark.parametrize("trainer", list(CASES))
def test_fp16_base_trains_in_one_compute_dtype(fp16_model, tmp_path, trainer):
    """mixed_precision=no over an fp16 copy: every frozen module fp32, trained weights fp32, finite loss, exports."""
    recipe, overrides, ui_name, _ = CASES[trainer]
    cfg = tiny_run_config(recipe, fp16_model, tmp_path, "model.variant=fp16", "train.mixed_precision=no", *SHORT,
                          *[o for o in overrides if "blend" not in o], "lora.train_text_encoder=false"
                          if trainer == "lora" else "train.seed=0")
    trainer_obj = Trainer(cfg)
    result = trainer_obj.run()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.last_loss))
    for name in ("unet", "vae", "text_encoder"):
        assert {p.dtype for p in getattr(trainer_obj.models, name).parameters()} == {torch.float32}, name
    assert {p.dtype for p in trainer_obj.params} == {torch.float32}
    for ema in getattr(trainer_obj.method, "emas", {}).values():
        assert {s.dtype for s in ema.shadow_params} == {torch.float32}
    assert (tmp_path / "final" / ui_name).is_file()


def test_make_tiny_model_writes_the_dtype_asked_in_the_hub_layout(tmp_path, capsys):
    from dreamtune.cli import main

    assert main(["make-tiny-model", str(tmp_path / "m"), "--dtype", "fp16"]) == 0
    assert "tiny SD 1.x model (random weights, seed 0, fp16)" in capsys.readouterr().out
    with safe_open(str(tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    with safe_open(str(tmp_path / "m" / "text_encoder" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
    with pytest.raises(SystemExit):
        main(["make-tiny-model", str(tmp_path / "x"), "--architecture", "sd21"])
