"""LoRA-family keys and tools: config checks, LoRA+ groups, inspect/convert/merge-lora on LyCORIS files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamtune.cli import main
from dreamtune.config import load_config
from dreamtune.training.loop import Trainer

from .conftest import REPO_ROOT, tiny_run_config


def lora_cfg(*overrides: str):
    return load_config(REPO_ROOT / "configs" / "tiny_lora.yaml", list(overrides))


@pytest.mark.parametrize("overrides, message", [
    (["lora.type=loha", "lora.init=pissa"], r"lora.init applies to lora.type lora or dora, not loha"),
    (["lora.type=lokr", "lora.rslora=true"], r"lora.rslora applies to lora.type lora or dora"),
    (["lora.type=loha", "lora.plus_ratio=4"], r"lora.plus_ratio applies to lora.type lora or dora"),
    (["lora.rank_dropout=0.1"], r"lora.rank_dropout applies to lora.type loha or lokr"),
    (["lora.conv_alpha=2"], r"lora.conv_alpha needs lora.conv_rank"),
    (["lora.init=olora", "lora.conv_rank=4"], r"lora.init=olora initialises linear layers only"),
    (["lora.type=lycoris"], r"lora.type"),
    (["lora.type=lokr", "lora.init_from=x.safetensors"], r"lora.init_from applies to lora.type lora or dora"),
    (["lora.init=pissa", "lora.init_from=x.safetensors"], r"lora.init=pissa and lora.init_from both set"),
])
def test_contradicting_keys_are_refused_with_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        lora_cfg(*overrides)


def test_a_pattern_matching_no_adapted_module_is_named(tiny_model_dir, tmp_path):
    cfg = tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, "lora.rank_pattern={to_qq: 2}",
                          "train.max_steps=1", "validation.prompts=[]")
    with pytest.raises(ValueError, match=r"lora.rank_pattern: 'to_qq' matches no adapted module"):
        Trainer(cfg).run()


def test_plus_ratio_puts_the_b_matrices_in_their_own_group(tiny_model_dir, tmp_path):
    cfg = tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, "lora.plus_ratio=16", "lora.train_text_encoder=true",
                          "lora.text_encoder_lr=1.0e-4", "train.learning_rate=1.0e-3", "train.lr_warmup_steps=0",
                          "train.lr_scheduler=constant", "train.max_steps=1", "validation.prompts=[]")
    trainer = Trainer(cfg)
    trainer.run()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert sorted(groups) == ["text_encoder", "text_encoder_lora_B", "unet", "unet_lora_B"]
    assert groups["unet_lora_B"]["lr"] == pytest.approx(16e-3) and groups["unet"]["lr"] == pytest.approx(1e-3)
    assert groups["text_encoder_lora_B"]["lr"] == pytest.approx(16e-4)
    named = {id(p): n for m in trainer.method.trained_modules().values() for n, p in m.named_parameters()}
    assert groups["unet_lora_B"]["params"] and all(".lora_B." in named[id(p)] for p in groups["unet_lora_B"]["params"])
    assert not any(".lora_B." in named[id(p)] for p in groups["unet"]["params"])
    trainable = sum(p.requires_grad for m in trainer.method.trained_modules().values() for p in m.parameters())
    assert sum(len(g["params"]) for g in groups.values()) == trainable


# ----------------------------------------------------------------------------- LyCORIS files in the weight tools


LOHA_MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
LOKR_MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
DORA_MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"


@pytest.fixture()
def lycoris_file(tiny_model_dir, tmp_path):
    """A hand-written file in the LyCORIS layout: LoHa, split-factor LoKr and DoRA modules on one attention block."""
    unet = load_file(str(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    out_dim, in_dim = unet["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"].shape
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    a, b = 4, out_dim // 4  # lokr_w1 [a, c] x lokr_w2 [b, d]
    tensors = {
        f"{LOHA_MODULE}.hada_w1_a": rand(out_dim, 2), f"{LOHA_MODULE}.hada_w1_b": rand(2, in_dim),
        f"{LOHA_MODULE}.hada_w2_a": rand(out_dim, 2), f"{LOHA_MODULE}.hada_w2_b": rand(2, in_dim),
        f"{LOHA_MODULE}.alpha": torch.tensor(1.0),
        f"{LOKR_MODULE}.lokr_w1": rand(a, 4), f"{LOKR_MODULE}.lokr_w2_a": rand(b, 2),
        f"{LOKR_MODULE}.lokr_w2_b": rand(2, in_dim // 4), f"{LOKR_MODULE}.alpha": torch.tensor(4.0),
        f"{DORA_MODULE}.lora_down.weight": rand(2, in_dim), f"{DORA_MODULE}.lora_up.weight": rand(out_dim, 2),
        f"{DORA_MODULE}.dora_scale": rand(1, in_dim).abs() + 1, f"{DORA_MODULE}.alpha": torch.tensor(2.0),
    }
    path = tmp_path / "lycoris.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return path, tensors, unet


def test_merge_lora_applies_loha_lokr_and_dora_at_a_strength(lycoris_file, tiny_model_dir, tmp_path):
    path, t, unet = lycoris_file
    out = tmp_path / "merged"
    assert main(["merge-lora", str(tiny_model_dir), "--lora", f"{path}:0.5", "--out", str(out), "--format",
                 "diffusers", "--no-hash"]) == 0
    merged = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    prefix = "down_blocks.0.attentions.0.transformer_blocks.0.attn1."
    w = {k: unet[prefix + f"{k}.weight"] for k in ("to_q", "to_k", "to_v")}
    loha = (t[f"{LOHA_MODULE}.hada_w1_a"] @ t[f"{LOHA_MODULE}.hada_w1_b"]) * (
        t[f"{LOHA_MODULE}.hada_w2_a"] @ t[f"{LOHA_MODULE}.hada_w2_b"]) * (1.0 / 2)
    lokr = torch.kron(t[f"{LOKR_MODULE}.lokr_w1"], t[f"{LOKR_MODULE}.lokr_w2_a"] @ t[f"{LOKR_MODULE}.lokr_w2_b"]) * (4.0 / 2)
    v = w["to_v"] + t[f"{DORA_MODULE}.lora_up.weight"] @ t[f"{DORA_MODULE}.lora_down.weight"] * (2.0 / 2)
    dora = v * t[f"{DORA_MODULE}.dora_scale"] / v.norm(dim=0, keepdim=True)
    torch.testing.assert_close(merged[prefix + "to_q.weight"], w["to_q"] + 0.5 * loha)
    torch.testing.assert_close(merged[prefix + "to_k.weight"], w["to_k"] + 0.5 * lokr)
    torch.testing.assert_close(merged[prefix + "to_v.weight"], w["to_v"] + 0.5 * (dora - w["to_v"]))


def test_output_axis_dora_is_refused(lycoris_file, tiny_model_dir, tmp_path, capsys):
    path, t, _ = lycoris_file
    t = {**t, f"{DORA_MODULE}.dora_scale": t[f"{DORA_MODULE}.lora_up.weight"][:, :1].abs()}
    save_file(t, str(tmp_path / "out_axis.safetensors"))
    assert main(["merge-lora", str(tiny_model_dir), "--lora", str(tmp_path / "out_axis.safetensors"),
                 "--out", str(tmp_path / "m.safetensors"), "--no-hash"]) != 0
    assert "not on the input axis" in capsys.readouterr().err


def test_inspect_and_convert_name_the_algorithms(lycoris_file, tmp_path, capsys):
    path, t, _ = lycoris_file
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "lora" and info["algorithms"] == {"dora": 1, "loha": 1, "lokr": 1}
    assert info["modules"] == {"unet": 3, "text_encoder": 0} and info["alphas"] == [1.0, 2.0, 4.0]
    assert main(["convert", str(path), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) != 0
    assert "diffusers cannot load these" in capsys.readouterr().err
    assert main(["convert", str(path), str(tmp_path / "half.safetensors"), "--to", "kohya", "--dtype", "fp16"]) == 0
    half = load_file(str(tmp_path / "half.safetensors"))
    assert half.keys() == t.keys()
    assert half[f"{LOHA_MODULE}.hada_w1_a"].dtype == torch.float16 and half[f"{LOHA_MODULE}.alpha"].dtype == torch.float32


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_tucker_conv_factors_rebuild_as_peft_computes_them(kind):
    """hada_t1/t2 and lokr_t2 (LyCORIS' Tucker convs, as PEFT's use_effective_conv2d writes them) merge exactly."""
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model

    from dreamtune.trainers.lora.family import adapter_modules
    from dreamtune.weights.lycoris_merge import module_delta

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1))
    config = (LoHaConfig if kind == "loha" else LoKrConfig)(r=2, alpha=3, target_modules=["0"], use_effective_conv2d=True)
    inject_adapter_in_model(config, model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.normal_(0, 0.5)
    module = adapter_modules(model)["0"]
    assert {"loha": "hada_t1", "lokr": "lokr_t2"}[kind] in module.tensors
    layer = model[0]
    expected = layer.get_delta_weight("default")
    torch.testing.assert_close(module_delta(module, tuple(expected.shape), "0"), expected, atol=1e-5, rtol=1e-4)
