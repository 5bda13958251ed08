"""Weight tools: blend, add-difference, run averaging, LoRA merge, conversions, inspect, and their CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreamtune.cli import main
from dreamtune.weights import safetensors_io
from dreamtune.weights.blend import (
    BlendError,
    add_difference_coefficients,
    average_weights,
    blend_with_base,
    combine,
    mixed_keys_filter,
)
from dreamtune.errors import WeightsError
from dreamtune.weights.checkpoint import convert_checkpoint, open_checkpoint
from dreamtune.weights.describe import describe
from dreamtune.weights.embeddings import convert_embedding, save_diffusers_embedding
from dreamtune.weights.ldm_keys import component_of, unet_key_map
from dreamtune.weights.lora_files import convert_lora, read_lora
from dreamtune.weights.lora_formats import kohya_metadata, peft_to_kohya
from dreamtune.weights.lycoris_formats import AdapterFile, AdapterModule
from dreamtune.weights.lycoris_merge import merge_adapters
from dreamtune.weights.merge import lora_delta
from dreamtune.weights.sources import read_state

PROMPT = "a red circle"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("weight-tools")


@pytest.fixture(scope="module")
def tiny_b(work) -> Path:
    """A second tiny model (other seed) as a diffusers folder."""
    from dreamtune.models.tiny import save_tiny_model

    return save_tiny_model(work / "tiny-b", seed=1)


@pytest.fixture(scope="module")
def single_a(work, tiny_model_dir) -> Path:
    """The tiny model as an fp32 single-file checkpoint."""
    return convert_checkpoint(tiny_model_dir, work / "a.safetensors", "single-file", None, {})


@pytest.fixture(scope="module")
def kohya_lora(work, tiny_model_dir) -> Path:
    """A kohya LoRA (r=4, alpha=8, random nonzero lora_B) on the tiny UNet attention and text-encoder layers."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    parts = {}
    for name, model, targets in (
        ("unet", UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet"), ["to_q", "to_k", "to_v", "to_out.0"]),
        ("text_encoder", CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder"), ["q_proj", "v_proj"]),
    ):
        model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=True))
        state = get_peft_model_state_dict(model)
        parts[name] = {k: (torch.randn_like(v) * 0.3 if "lora_B" in k else v) for k, v in state.items()}
    tensors = peft_to_kohya(parts["unet"], parts["text_encoder"], rank=4, alpha=8)
    path = work / "kohya_lora.safetensors"
    save_file(tensors, str(path), metadata=kohya_metadata(rank=4, alpha=8, title="t", tensors=tensors))
    return path


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def _render(pipe) -> torch.Tensor:
    """One 32px image, 2 steps, fixed seed, as an array."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = pipe(PROMPT, num_inference_steps=2, height=32, width=32, generator=generator, output_type="np")
    return torch.from_numpy(out.images[0])


# ----------------------------------------------------------------------------- blend


def test_blend_alpha_endpoints_and_mean_with_mixed_layouts(single_a, tiny_b):
    mixed = mixed_keys_filter(unet_only=False)
    with open_checkpoint(single_a) as a, open_checkpoint(tiny_b) as b:
        state_a, state_b = read_state(a), read_state(b)
        one = combine([a, b], average_weights(None, 1.0, 2), mixed)
        zero = combine([a, b], average_weights(None, 0.0, 2), mixed)
        half = combine([a, b], average_weights(None, 0.5, 2), mixed)
    assert set(one) == set(state_a)
    for key, tensor in state_a.items():
        assert torch.equal(one[key], tensor), key
        blended_part = component_of(key) in ("unet", "text_encoder")
        assert torch.equal(zero[key], state_b[key] if blended_part else tensor), key
        expected = (tensor.float() + state_b[key].float()) / 2 if blended_part else tensor
        assert torch.allclose(half[key], expected, atol=1e-6), key
    assert not torch.equal(state_a["first_stage_model.decoder.conv_out.weight"],
                           state_b["first_stage_model.decoder.conv_out.weight"])


def test_unet_only_keeps_text_encoder_of_first(single_a, tiny_b):
    with open_checkpoint(single_a) as a, open_checkpoint(tiny_b) as b:
        out = combine([a, b], [0.0, 1.0], mixed_keys_filter(unet_only=True))
        te_key = next(k for k in a.keys if component_of(k) == "text_encoder" and k.endswith("q_proj.weight"))
        unet_key = "model.diffusion_model.input_blocks.0.0.weight"
        assert torch.equal(out[te_key], a.get(te_key))
        assert torch.equal(out[unet_key], b.get(unet_key))


def test_add_difference_on_known_tensors(tmp_path):
    key, vae = "model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_out.weight"
    paths = [_write(tmp_path / f"{n}.safetensors", {key: torch.full((2, 3), v), vae: torch.full((2,), v)})
             for n, v in (("a", 1.0), ("b", 5.0), ("c", 3.0))]
    sources = [open_checkpoint(p) for p in paths]
    out = combine(sources, add_difference_coefficients(0.5), mixed_keys_filter(False))
    assert torch.equal(out[key], torch.full((2, 3), 2.0))  # 1 + 0.5 * (5 - 3)
    assert torch.equal(out[vae], torch.full((2,), 1.0))


def test_shape_and_key_mismatch_name_key_and_shapes(tmp_path):
    key = "model.diffusion_model.out.2.weight"
    a = _write(tmp_path / "a.safetensors", {key: torch.zeros(4, 3)})
    b = _write(tmp_path / "b.safetensors", {key: torch.zeros(4, 5)})
    c = _write(tmp_path / "c.safetensors", {"model.diffusion_model.out.0.weight": torch.zeros(4)})
    with pytest.raises(BlendError, match=r"out\.2\.weight.*\(4, 3\).*\(4, 5\)"):
        combine([open_checkpoint(a), open_checkpoint(b)], [0.5, 0.5], mixed_keys_filter(False))
    with pytest.raises(BlendError, match=r"out\.2\.weight.*\(4, 3\).*missing from c\.safetensors"):
        combine([open_checkpoint(a), open_checkpoint(c)], [0.5, 0.5], mixed_keys_filter(False))


def test_blend_with_base():
    tuned, base = {"w": torch.ones(2, dtype=torch.float16)}, {"w": torch.zeros(2)}
    assert torch.equal(blend_with_base(tuned, base, 0.25)["w"], torch.full((2,), 0.25, dtype=torch.float16))
    assert torch.equal(blend_with_base(tuned, base, 0.0)["w"], torch.zeros(2, dtype=torch.float16))
    with pytest.raises(BlendError, match=r"'w'.*\(2,\).*\(3,\)"):
        blend_with_base(tuned, {"w": torch.zeros(3)}, 0.5)


# ----------------------------------------------------------------------------- LoRA merge


def test_merged_lora_matches_runtime_lora(work, tiny_model_dir, kohya_lora):
    from diffusers import StableDiffusionPipeline

    from dreamtune.weights.single_file import load_single_file_pipeline

    out = work / "merged.safetensors"
    assert main(["merge-lora", str(tiny_model_dir), "--lora", f"{kohya_lora}:1.0", "--out", str(out)]) == 0
    # diffusers 0.42 cannot load kohya text-encoder LoRA keys on transformers 5 ("Could not automatically
    # infer state dict type"), so the runtime side loads the same LoRA converted to diffusers' layout.
    runtime_file = convert_lora(kohya_lora, work / "runtime" / "pytorch_lora_weights.safetensors", "diffusers",
                                None, {})
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    base_image = _render(pipe)
    pipe.load_lora_weights(str(runtime_file.parent))
    runtime = _render(pipe)
    merged = _render(load_single_file_pipeline(out, config_dir=tiny_model_dir))
    assert (runtime - base_image).abs().max() > 1e-2  # the LoRA changes the image
    assert (merged - runtime).abs().max() < 1e-3
    meta = safetensors_io.read_metadata(out)
    assert meta["dreamtune.command"] == "dreamtune merge-lora"
    assert json.loads(meta["dreamtune.settings"])["loras"] == [{"file": kohya_lora.name, "scale": 1.0}]
    assert len(json.loads(meta["dreamtune.inputs_file_sha256"])) == 2


def test_conv_lora_merge_math(single_a, tiny_model_dir):
    from dreamtune.weights.diffusers_folder import read_json as _read_json

    torch.manual_seed(1)
    down, up = torch.randn(2, 32, 3, 3), torch.randn(32, 2, 1, 1)
    x = torch.randn(1, 32, 8, 8)
    composed = F.conv2d(F.conv2d(x, down, padding=1), up)
    assert torch.allclose(F.conv2d(x, lora_delta(down, up, (32, 32, 3, 3), "k"), padding=1), composed, atol=1e-4)
    down1, up1 = torch.randn(2, 32, 1, 1), torch.randn(64, 2, 1, 1)
    assert torch.allclose(lora_delta(down1, up1, (64, 32, 1, 1), "k")[:, :, 0, 0], up1[:, :, 0, 0] @ down1[:, :, 0, 0])

    unet_map = unet_key_map(_read_json(tiny_model_dir / "unet" / "config.json"))
    lora = AdapterFile(unet={"down_blocks.0.resnets.0.conv1": AdapterModule(
        "lora", {"lora_down.weight": down, "lora_up.weight": up}, alpha=1.0)})
    key = unet_map.to_single["down_blocks.0.resnets.0.conv1.weight"]
    with open_checkpoint(single_a) as base:
        merged = merge_adapters(base, [(lora, 0.8)], unet_map)
        expected = base.get(key) + 0.8 * 0.5 * torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
    assert torch.allclose(merged[key], expected, atol=1e-5)


# ----------------------------------------------------------------------------- conversions


def test_checkpoint_round_trip(work, tiny_model_dir, single_a):
    folder = convert_checkpoint(single_a, work / "roundtrip-diffusers", "diffusers", None, {"k": "v"},
                                config_dir=tiny_model_dir)
    again = convert_checkpoint(folder, work / "roundtrip.safetensors", "single-file", None, {})
    first, second = load_file(single_a), load_file(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    for component, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                            ("text_encoder", "model")):
        original = load_file(tiny_model_dir / component / f"{name}.safetensors")
        rebuilt = load_file(folder / component / f"{name}.safetensors")
        assert all(torch.equal(original[k], rebuilt[k]) for k in original if "position_ids" not in k)
    assert json.loads((folder / "dreamtune_provenance.json").read_text()) == {"k": "v"}


def test_lora_round_trips(work, kohya_lora):
    diffusers = convert_lora(kohya_lora, work / "lora-d" / "pytorch_lora_weights.safetensors", "diffusers", None, {})
    back = convert_lora(diffusers, work / "lora-k.safetensors", "kohya", None, {})
    again = convert_lora(back, work / "lora-d2.safetensors", "diffusers", None, {})
    assert load_file(diffusers).keys() == load_file(again).keys()
    assert all(torch.equal(v, load_file(again)[k]) for k, v in load_file(diffusers).items())
    original, converted = read_lora(kohya_lora), read_lora(back)
    for module, (a, b) in original.modules("unet").items():  # same effective update alpha/r * B @ A
        a2, b2 = converted.modules("unet")[module]
        assert torch.allclose(original.scale(module) * b @ a, converted.scale(module) * b2 @ a2, atol=1e-6)
    assert converted.modules("text_encoder").keys() == original.modules("text_encoder").keys()


def test_embedding_round_trip(work):
    vectors = torch.randn(3, 32)
    src = save_diffusers_embedding(work / "ti.safetensors", "<sks>", vectors)
    a1111 = convert_embedding(src, work / "sks.safetensors", "a1111", None, {})
    back = convert_embedding(a1111, work / "ti2.safetensors", "diffusers", None, {}, token="<sks>")
    assert list(load_file(a1111)) == ["emb_params"]
    assert torch.equal(load_file(back)["<sks>"], vectors)
    half = convert_embedding(src, work / "ti16.safetensors", "a1111", torch.float16, {})
    assert load_file(half)["emb_params"].dtype == torch.float16


# ----------------------------------------------------------------------------- inspect, safety


def test_inspect_identifies_each_kind(work, tiny_model_dir, single_a, kohya_lora):
    diffusers_lora = convert_lora(kohya_lora, work / "insp-lora.safetensors", "diffusers", None, {})
    ti = save_diffusers_embedding(work / "insp-ti.safetensors", "<x>", torch.randn(2, 32))
    a1111 = convert_embedding(ti, work / "insp-a1111.safetensors", "a1111", None, {})
    cases = {
        str(tiny_model_dir): ("checkpoint", "diffusers"),
        str(single_a): ("checkpoint", "single-file"),
        str(kohya_lora): ("lora", "kohya"),
        str(diffusers_lora): ("lora", "diffusers"),
        str(ti): ("textual-inversion", "diffusers"),
        str(a1111): ("textual-inversion", "a1111"),
    }
    for path, expected in cases.items():
        info = describe(path)
        assert (info["kind"], info["layout"]) == expected, path
    lora = describe(kohya_lora)
    assert lora["ranks"] == [4] and lora["alphas"] == [8.0] and lora["modules"]["text_encoder"] == 4
    assert lora["targets"]["to_q"] == lora["modules"]["unet"] // 4
    assert describe(ti)["vectors"] == 2 and describe(ti)["dim"] == 32 and describe(ti)["token"] == "<x>"


def test_pickle_refused_without_flag(work, single_a, tiny_b, capsys):
    ckpt = work / "a.ckpt"
    torch.save({"state_dict": load_file(single_a)}, ckpt)
    with pytest.raises(WeightsError, match="--allow-pickle"):
        open_checkpoint(ckpt)
    out = work / "pickle-blend.safetensors"
    assert main(["blend", str(ckpt), str(tiny_b), "--out", str(out), "--no-hash"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not out.exists()
    assert main(["blend", str(ckpt), str(tiny_b), "--out", str(out), "--allow-pickle", "--no-hash"]) == 0
    assert main(["inspect", str(ckpt)]) == 2


def test_interrupted_write_leaves_nothing(work, single_a, tiny_b, monkeypatch):
    def broken(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io, "save_file", broken)
    out = work / "interrupted" / "blend.safetensors"
    with pytest.raises(OSError, match="disk full"):
        main(["blend", str(single_a), str(tiny_b), "--out", str(out), "--no-hash"])
    assert list(out.parent.iterdir()) == []

    from diffusers import StableDiffusionPipeline

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", lambda self, folder, **kw: broken({}, Path(folder) / "x"))
    folder = work / "interrupted" / "blend-folder"
    with pytest.raises(OSError, match="disk full"):
        main(["blend", str(single_a), str(tiny_b), "--out", str(folder), "--format", "diffusers", "--no-hash"])
    assert list(folder.parent.iterdir()) == []


# ----------------------------------------------------------------------------- CLI smoke


def test_cli_blend_variants(work, tiny_model_dir, single_a, tiny_b):
    out = work / "cli-blend.safetensors"
    assert main(["blend", str(single_a), str(tiny_b), "--weights", "0.7,0.3", "--dtype", "fp16", "--out", str(out)]) == 0
    meta = safetensors_io.read_metadata(out)
    assert json.loads(meta["dreamtune.settings"])["coefficients"] == pytest.approx([0.7, 0.3])
    assert json.loads(meta["dreamtune.inputs"]) == [single_a.name, tiny_b.name]
    with safe_open(str(out), "pt") as fh:
        assert fh.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    folder = work / "cli-adddiff"
    assert main(["blend", "--add-difference", str(tiny_b), str(single_a), str(tiny_model_dir), "--multiplier", "0.5",
                 "--format", "diffusers", "--out", str(folder), "--no-hash"]) == 0
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    grid = work / "sweep.png"
    assert main(["blend", str(single_a), str(tiny_b), "--sweep", "0,1", "--prompt", PROMPT,
                 "--steps", "1", "--resolution", "32", "--out", str(grid), "--config-dir", str(tiny_model_dir)]) == 0
    from PIL import Image

    assert Image.open(grid).size[0] == 2 * 32


def test_cli_blend_run_average(work):
    run = work / "run"
    for step, value in ((100, 1.0), (200, 2.0), (300, 4.0)):
        folder = run / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        save_file({"conv_in.weight": torch.full((2, 2), value)}, str(folder / "trainable_unet.safetensors"))
    out = work / "avg.safetensors"
    assert main(["blend", "--run", str(run), "--last", "2", "--out", str(out)]) == 0
    assert torch.equal(load_file(out)["conv_in.weight"], torch.full((2, 2), 3.0))
    assert json.loads(safetensors_io.read_metadata(out)["dreamtune.settings"])["checkpoints"] == [
        "step-000200", "step-000300"]


def test_cli_convert_and_inspect(work, tiny_model_dir, kohya_lora, capsys):
    single = work / "cli-convert.safetensors"
    assert main(["convert", str(tiny_model_dir), str(single), "--dtype", "fp16"]) == 0
    assert safetensors_io.read_metadata(single)["dreamtune.command"] == "dreamtune convert"
    folder = work / "cli-convert-diffusers"
    assert main(["convert", str(single), str(folder), "--config-dir", str(tiny_model_dir)]) == 0
    assert (folder / "model_index.json").is_file()
    lora_out = work / "cli-lora.safetensors"
    assert main(["convert", str(kohya_lora), str(lora_out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(lora_out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["layout"], info["ranks"]) == ("lora", "diffusers", [4])
    assert main(["inspect", str(single)]) == 0
    assert "checkpoint (single-file)" in capsys.readouterr().out
