"""The LoRA family (LoRA with rsLoRA/PiSSA, LoCon, DoRA, LoHa, LoKr) end to end on the tiny model.

For each type a short run exports its UI file; that file, baked into the untouched base by
`dreamtune merge-lora`, must give the weights of the trained PEFT model with its adapters fused,
and its keys and shapes must follow the LyCORIS convention. The convention is checked here by a
reader written from the UIs' rules (A1111 network_*.py, ComfyUI weight_adapter/), not by ours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreamtune.cli import main
from dreamtune.trainers.lora.family import fused_weights
from dreamtune.training.loop import Trainer

from .conftest import render_32, tiny_run_config

#: name -> overrides. Each sets alpha != rank so a lost scale shows, and adds the type's own options.
TYPES = {
    "lora_rslora_pissa": ["lora.type=lora", "lora.rslora=true", "lora.init=pissa", "lora.alpha=6",
                          "lora.rank_pattern={to_k: 2}"],
    "locon": ["lora.type=lora", "lora.conv_rank=2", "lora.conv_alpha=1", "lora.alpha=16", "lora.plus_ratio=4"],
    "dora": ["lora.type=dora", "lora.conv_rank=2", "lora.conv_alpha=4", "lora.alpha=16"],
    "dora_olora": ["lora.type=dora", "lora.init=olora", "lora.alpha=4", "lora.rank=2"],
    "loha": ["lora.type=loha", "lora.conv_rank=2", "lora.alpha=16", "lora.rank_dropout=0.1",
             "lora.module_dropout=0.1"],
    # rank 8 keeps both LoKr factors full (no alpha in the UIs); rank 2 on to_v/q_proj splits lokr_w2.
    "lokr": ["lora.type=lokr", "lora.conv_rank=2", "lora.alpha=16", "lora.rank_pattern={to_v: 2, q_proj: 2}"],
}


def family_config(model_dir: Path, out: Path, *overrides: str):
    return tiny_run_config(
        "tiny_lora.yaml", model_dir, out,
        "train.max_steps=3", "train.learning_rate=2.0e-2", "train.lr_warmup_steps=0", "train.save_every=0",
        "validation.prompts=[]", "lora.train_text_encoder=true", "export.dtype=fp32", *overrides,
    )


@pytest.fixture(scope="module", params=list(TYPES))
def trained(request, tiny_model_dir, tmp_path_factory):
    """One short run of each type, its UI file baked into the base by merge-lora, and PEFT's fused weights."""
    out = tmp_path_factory.mktemp(request.param)
    trainer = Trainer(family_config(tiny_model_dir, out, *TYPES[request.param]))
    result = trainer.run()
    ui_file = result.output_dir / "final" / "sks_toy_lora.safetensors"
    merged = out / "merged"
    assert main(["merge-lora", str(tiny_model_dir), "--lora", str(ui_file), "--out", str(merged),
                 "--format", "diffusers", "--no-hash"]) == 0
    return {"name": request.param, "trainer": trainer, "ui_file": ui_file, "merged": merged,
            "fused": {"unet": fused_weights(trainer.models.unet), "text_encoder": fused_weights(trainer.models.text_encoder)}}


def _weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return {k.removeprefix("text_model."): v.float() for k, v in load_file(str(folder / component / name)).items()}


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_merged_ui_file_equals_fused_peft_model(trained, tiny_model_dir, component):
    merged, base = _weights(trained["merged"], component), _weights(tiny_model_dir, component)
    fused = trained["fused"][component]
    assert fused, "no adapted layers"
    moved = 0.0
    for key, weight in merged.items():
        path = key.rsplit(".", 1)[0]
        adapted = key.endswith(".weight") and path in fused
        expected = fused[path] if adapted else base[key]
        torch.testing.assert_close(weight, expected, atol=2e-5, rtol=1e-4, msg=f"{trained['name']}: {key}")
        if adapted:
            moved = max(moved, (fused[path] - base[key]).abs().max().item())
    assert moved > 1e-3, "training must move the adapted weights"


# ----------------------------------------------------------------------------- the LyCORIS convention, read independently


def _kohya(path: str, component: str) -> str:
    if component == "unet":
        return "lora_unet_" + path.replace(".", "_")
    return "lora_te_text_model_" + path.removeprefix("text_model.").replace(".", "_")


def _ui_delta(t: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The update A1111/ComfyUI build from one module's tensors (scale applied), and its dora_scale."""
    alpha = float(t["alpha"])
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"].flatten(1), t["lora_up.weight"].flatten(1)
        return (up @ down).reshape(shape) * alpha / down.shape[0], t.get("dora_scale")
    if "hada_w1_a" in t:
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return delta.reshape(shape) * alpha / t["hada_w1_b"].shape[0], None
    dim = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        w1, dim = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
    w2 = t.get("lokr_w2")
    if w2 is None:
        w2, dim = t["lokr_w2_a"] @ t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape) * (alpha / dim if dim else 1.0), None


def _check_shapes(name: str, t: dict[str, torch.Tensor], shape: tuple[int, ...]) -> None:
    out, inn, kernel = shape[0], shape[1], int(np.prod(shape[2:], dtype=int))
    assert t["alpha"].dim() == 0, name
    if "lora_down.weight" in t:
        r = t["lora_down.weight"].shape[0]
        assert tuple(t["lora_down.weight"].shape) == ((r, inn, *shape[2:]) if len(shape) == 4 else (r, inn)), name
        assert tuple(t["lora_up.weight"].shape) == ((out, r, 1, 1) if len(shape) == 4 else (out, r)), name
        if "dora_scale" in t:  # the input axis: [1, in] (conv [1, in, 1, 1]), what A1111 and ComfyUI normalise
            assert tuple(t["dora_scale"].shape) == ((1, inn, 1, 1) if len(shape) == 4 else (1, inn)), name
    elif "hada_w1_a" in t:
        r = t["hada_w1_b"].shape[0]
        for w in ("w1", "w2"):
            assert tuple(t[f"hada_{w}_a"].shape) == (out, r) and tuple(t[f"hada_{w}_b"].shape) == (r, inn * kernel), name
    else:
        a, c = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            b, d = t["lokr_w2"].shape[:2]
            assert t["lokr_w2"].dim() in (2, len(shape)), name
        else:
            b, d = t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1] // kernel
            assert t["lokr_w2_a"].shape[1] == t["lokr_w2_b"].shape[0], name
        assert (a * b, c * d) == (out, inn), name


SUFFIXES = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
}


def test_ui_file_follows_the_lycoris_convention(trained, tiny_model_dir):
    with safe_open(str(trained["ui_file"]), "pt") as f:
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = tensor
    kind = {"locon": "lora"}.get(trained["name"], trained["name"].split("_")[0])
    seen = set()
    for component in ("unet", "text_encoder"):
        base = _weights(tiny_model_dir, component)
        for path, fused in trained["fused"][component].items():
            name = _kohya(path, component)
            assert name in groups, f"{name} missing from the UI file"
            seen.add(name)
            t = groups[name]
            if kind in SUFFIXES:
                assert set(t) == SUFFIXES[kind], (name, sorted(t))
            else:
                assert set(t) - {"alpha"} <= {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
            weight = base[path + ".weight"]
            _check_shapes(name, t, tuple(weight.shape))
            delta, dora_scale = _ui_delta(t, tuple(weight.shape))
            rebuilt = weight + delta
            if dora_scale is not None:  # A1111/ComfyUI: (W + dW) * dora_scale / ||W + dW|| per input column
                norm = rebuilt.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
                rebuilt = rebuilt * (dora_scale.flatten() / norm).reshape(1, -1, *[1] * (weight.dim() - 2))
            torch.testing.assert_close(rebuilt, fused, atol=2e-5, rtol=1e-4, msg=name)
    assert seen == set(groups), f"modules in the file that the model does not adapt: {sorted(set(groups) - seen)}"
    if trained["name"] == "lokr":
        split = [n for n, t in groups.items() if "lokr_w2_a" in t]
        full = [n for n, t in groups.items() if "lokr_w2" in t]
        assert split and full, "the lokr case must cover both a split and a full lokr_w2"
    if trained["name"] in ("locon", "dora", "loha", "lokr"):
        assert any("_resnets_" in n and n.endswith(("_conv1", "_conv2")) for n in groups), "conv_rank adds LoCon"


def test_ui_file_metadata_names_the_network(trained):
    import json

    with safe_open(str(trained["ui_file"]), "pt") as f:
        meta = f.metadata()
    kind = trained["name"].split("_")[0]
    if kind == "locon" or kind == "lora":
        assert meta["ss_network_module"] == "networks.lora"
    else:
        assert meta["ss_network_module"] == "lycoris.kohya"
        args = json.loads(meta["ss_network_args"])
        assert args["algo"] == {"dora": "lora", "loha": "loha", "lokr": "lokr"}[kind]
        assert (args.get("dora_wd") == "True") == (kind == "dora")
    if trained["name"] in ("locon", "dora", "loha", "lokr"):
        args = json.loads(meta["ss_network_args"])
        assert args["conv_dim"] == "2"


def test_merged_checkpoint_draws_what_the_trained_model_draws(trained, tiny_model_dir):
    """The live model (PiSSA residual base, DoRA input hook, LoHa/LoKr layers) and the baked file render alike."""
    from diffusers import StableDiffusionPipeline

    from dreamtune.models.pipeline import build_pipeline, inference_scheduler

    m = trained["trainer"].models
    for module in (m.unet, m.text_encoder):
        module.eval()
    live = render_32(build_pipeline(m.tokenizer, m.text_encoder, m.vae, m.unet, inference_scheduler(m.noise_scheduler)),
                     "a photo of sks toy")
    pipe = StableDiffusionPipeline.from_pretrained(trained["merged"], safety_checker=None)
    pipe.scheduler = inference_scheduler(m.noise_scheduler)
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(render_32(pipe, "a photo of sks toy"), live, atol=2e-3)


# ----------------------------------------------------------------------------- checkpoints, resume, blend


@pytest.mark.parametrize("name", list(TYPES))
def test_resume_matches_a_straight_run(name, tiny_model_dir, tmp_path, capsys):
    """Stop at 2 and resume to 4 == 4 straight, bitwise: every trained tensor (dora_scale, hada_*, lokr_*) is
    checkpointed, and PiSSA/OLoRA's residual base is rebuilt the same on resume."""
    straight = tmp_path / "straight"
    Trainer(family_config(tiny_model_dir, straight, *TYPES[name], "train.max_steps=4")).run()
    resumed = tmp_path / "resumed"
    for steps in (3, 4):  # the first run checkpoints step 2 (the last step is exported, not checkpointed)
        Trainer(family_config(tiny_model_dir, resumed, *TYPES[name], f"train.max_steps={steps}",
                              "train.save_every=2", "train.resume=auto")).run()
    assert "at step 2" in capsys.readouterr().out
    saved = load_file(str(resumed / "checkpoints" / "step-000002" / "trainable_unet.safetensors"))
    wanted = {"dora": "dora_scale", "loha": "hada_w1_a", "lokr": "lokr_w1"}.get(name.split("_")[0])
    assert wanted is None or any(wanted in k for k in saved), sorted(saved)[:5]
    a = load_file(str(straight / "final" / "sks_toy_lora.safetensors"))
    b = load_file(str(resumed / "final" / "sks_toy_lora.safetensors"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_run_average_blends_every_trained_tensor(tiny_model_dir, tmp_path):
    """`dreamtune blend --run` averages a LoKr/DoRA run's checkpoints tensor by tensor, as for LoRA."""
    out = tmp_path / "run"
    Trainer(family_config(tiny_model_dir, out, *TYPES["dora"], "train.max_steps=3", "train.save_every=1",
                          "train.checkpoints_total_limit=2")).run()
    target = tmp_path / "avg.safetensors"
    assert main(["blend", "--run", str(out), "--last", "2", "--out", str(target), "--no-hash"]) == 0
    first, second = (load_file(str(out / "checkpoints" / f"step-00000{i}" / "trainable_unet.safetensors"))
                     for i in (1, 2))
    averaged = load_file(str(target))
    assert averaged.keys() == first.keys() and any("dora_scale" in k for k in averaged)
    for key in first:
        torch.testing.assert_close(averaged[key], (first[key] + second[key]) / 2)


def test_sample_patches_the_ui_file_as_merge_lora_bakes_it(trained, tiny_model_dir, tmp_path):
    """`dreamtune sample --lora` applies LyCORIS files in memory with the merge math (diffusers loads none)."""
    from diffusers import StableDiffusionPipeline

    from dreamtune.weights.lycoris_files import read_adapter
    from dreamtune.weights.lycoris_merge import patch_models

    patched = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    assert patch_models(read_adapter(trained["ui_file"]), {"unet": patched.unet, "text_encoder": patched.text_encoder},
                        1.0) == sum(len(f) for f in trained["fused"].values())
    for component in ("unet", "text_encoder"):
        merged = _weights(trained["merged"], component)
        live = {k.removeprefix("text_model."): v for k, v in getattr(patched, component).state_dict().items()}
        for key, weight in merged.items():
            torch.testing.assert_close(live[key], weight, atol=1e-6, rtol=1e-6, msg=key)
    if trained["name"] == "loha":
        grid = tmp_path / "grid.png"
        assert main(["sample", "--model", str(tiny_model_dir), "--lora", str(trained["ui_file"]), "--prompt", "a toy",
                     "--steps", "2", "--images-per-prompt", "1", "--resolution", "32", "--out", str(grid)]) == 0
        assert grid.is_file()
