"""LoRA formats: PEFT <-> kohya keys, and files that load in diffusers at the trained strength."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from dreamtune.weights.lora_files import kohya_to_peft
from dreamtune.weights.lora_formats import (
    DIFFUSERS_LORA_WEIGHT_NAME,
    diffusers_lora_state_dict,
    kohya_metadata,
    lora_config_values,
    peft_to_kohya,
    save_diffusers_lora,
)
from dreamtune.weights.lora_formats import LoraFile as KohyaLora
from dreamtune.weights.lora_keys import SD1_MODULE_SEGMENTS
from dreamtune.weights.safetensors_io import load_safetensors, read_metadata, save_safetensors

RANK, ALPHA = 4, 8  # alpha != rank: a file that drops alpha renders at half strength
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PROMPT = "a photo of sks dog"


def _pipeline(model_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, generator=generator, output_type="np").images


def _add_random_lora(model, targets: list[str], seed: int) -> None:
    """Add a gaussian-init LoRA and randomize lora_B so the adapter changes the output."""
    torch.manual_seed(seed)
    model.add_adapter(
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights="gaussian")
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path) -> dict:
    """The tiny pipeline with an in-memory LoRA on UNet and text encoder, and its renders."""
    pipe = _pipeline(tiny_model_dir)
    base = _render(pipe)
    _add_random_lora(pipe.unet, UNET_TARGETS, seed=1)
    _add_random_lora(pipe.text_encoder, TE_TARGETS, seed=2)
    return {
        "base": base,
        "reference": _render(pipe),
        "unet": get_peft_model_state_dict(pipe.unet),
        "te": get_peft_model_state_dict(pipe.text_encoder),
        "unet_config": pipe.unet.peft_config["default"],
        "te_config": pipe.text_encoder.peft_config["default"],
        "unet_names": [n for n, _ in pipe.unet.named_modules() if "lora_" not in n],
        "te_names": [n for n, _ in pipe.text_encoder.named_modules() if "lora_" not in n],
    }


def _assert_same_image(image: np.ndarray, trained: dict) -> None:
    assert np.abs(trained["reference"] - trained["base"]).max() > 1e-2, "the LoRA must change the image"
    np.testing.assert_allclose(image, trained["reference"], atol=1e-4)


# ----------------------------------------------------------------------------- key conventions


def test_kohya_keys_follow_the_convention(trained: dict) -> None:
    kohya = peft_to_kohya(trained["unet"], trained["te"], rank=RANK, alpha=ALPHA)
    unet_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert torch.equal(
        kohya[f"{unet_q}.lora_down.weight"],
        trained["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"],
    )
    assert f"{unet_q}.lora_up.weight" in kohya
    assert "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0.alpha" in kohya
    te_alpha = kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"]
    assert te_alpha.ndim == 0 and te_alpha.item() == ALPHA
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in kohya
    n_modules = (len(trained["unet"]) + len(trained["te"])) // 2
    assert len(kohya) == 3 * n_modules
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in kohya)


@pytest.mark.parametrize("by_names", [True, False], ids=["module-names", "sd1-segments"])
def test_peft_kohya_peft_round_trip_is_exact(trained: dict, by_names: bool) -> None:
    kohya = peft_to_kohya(trained["unet"], trained["te"], rank=RANK, alpha=ALPHA)
    names = {"unet_module_names": trained["unet_names"], "text_encoder_module_names": trained["te_names"]}
    back = kohya_to_peft(kohya, **(names if by_names else {}))
    assert back.unet.keys() == trained["unet"].keys() and back.text_encoder.keys() == trained["te"].keys()
    for ours, theirs in ((back.unet, trained["unet"]), (back.text_encoder, trained["te"])):
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert set(back.alphas.values()) == {float(ALPHA)} and set(back.ranks.values()) == {RANK}
    assert "encoder.layers.0.self_attn.q_proj" in back.alphas  # transformers-5 naming


def test_sd1_segment_split_is_exact_for_every_sd15_layer() -> None:
    """The no-model fallback inverts the flattening for every Linear/Conv2d of SD 1.5's UNet and CLIP."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)  # SD 1.5's layout
        text_encoder = CLIPTextModel(CLIPTextConfig())

    def layers(model) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]

    unet_paths, te_paths = layers(unet), layers(text_encoder)
    tensors = {}
    for prefix, paths in (("lora_unet_", unet_paths), ("lora_te_text_model_", te_paths)):
        for path in paths:
            for suffix in ("lora_down.weight", "lora_up.weight"):
                tensors[f"{prefix}{path.replace('.', '_')}.{suffix}"] = torch.zeros(1, 1)
    back = kohya_to_peft(tensors)
    assert sorted(back.ranks) == sorted(unet_paths + te_paths)
    used = {s for p in unet_paths + te_paths for s in p.split(".") if not s.isdigit()}
    assert SD1_MODULE_SEGMENTS - used == {"text_model", "text_projection"}  # older/projection CLIP


def test_kohya_input_variants(trained: dict) -> None:
    """lora_te1_ (diffusers' exporter), a missing alpha (= rank), and alpha 0 (kohya: = rank)."""
    down, up = torch.randn(2, 32), torch.randn(32, 2)
    tensors = {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down,
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up,
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": down,
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": up,
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(0.0),
    }
    back = kohya_to_peft(tensors, text_encoder_module_names=trained["te_names"])
    assert torch.equal(back.text_encoder["encoder.layers.0.mlp.fc1.lora_A.weight"], down)
    assert back.alphas == {"encoder.layers.0.mlp.fc1": 2.0, "mid_block.attentions.0.proj_in": 2.0}
    assert back.ranks == {"encoder.layers.0.mlp.fc1": 2, "mid_block.attentions.0.proj_in": 2}


def test_older_transformers_text_model_keys_are_accepted() -> None:
    down, up = torch.randn(4, 8), torch.randn(8, 4)
    te = {
        "text_model.encoder.layers.3.mlp.fc2.lora_A.weight": down,
        "text_model.encoder.layers.3.mlp.fc2.lora_B.weight": up,
    }
    kohya = peft_to_kohya(None, te, rank=4, alpha={"encoder.layers.3.mlp.fc2": 2})
    assert kohya["lora_te_text_model_encoder_layers_3_mlp_fc2.alpha"].item() == 2
    assert diffusers_lora_state_dict(None, te).keys() == {
        "text_encoder.text_model.encoder.layers.3.mlp.fc2.lora_A.weight",
        "text_encoder.text_model.encoder.layers.3.mlp.fc2.lora_B.weight",
    }


def test_conv_lora_passes_through_unchanged() -> None:
    down, up = torch.randn(4, 32, 3, 3), torch.randn(64, 4, 1, 1)
    peft = {
        "down_blocks.1.resnets.0.conv1.lora_A.weight": down,
        "down_blocks.1.resnets.0.conv1.lora_B.weight": up,
    }
    kohya = peft_to_kohya(peft, None, rank=4, alpha=1)
    assert kohya["lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    back = kohya_to_peft(kohya)
    assert torch.equal(back.unet["down_blocks.1.resnets.0.conv1.lora_B.weight"], up)
    assert back.alphas["down_blocks.1.resnets.0.conv1"] == 1.0


def test_per_module_rank_and_alpha_from_peft_config() -> None:
    peft = {}
    for module, rank in (("down_blocks.0.attentions.0.proj_in", 4), ("mid_block.attentions.0.proj_out", 2)):
        peft[f"{module}.lora_A.weight"] = torch.randn(rank, 16)
        peft[f"{module}.lora_B.weight"] = torch.randn(16, rank)
    config = LoraConfig(
        r=4, lora_alpha=8, rank_pattern={"proj_out": 2}, alpha_pattern={"mid_block.*proj_out": 1}
    )
    ranks, alphas = lora_config_values(peft, config)
    assert ranks == {"down_blocks.0.attentions.0.proj_in": 4, "mid_block.attentions.0.proj_out": 2}
    assert alphas == {"down_blocks.0.attentions.0.proj_in": 8.0, "mid_block.attentions.0.proj_out": 1.0}
    kohya = peft_to_kohya(peft, None, rank=ranks, alpha=alphas)
    assert kohya["lora_unet_mid_block_attentions_0_proj_out.alpha"].item() == 1.0
    kwargs = kohya_to_peft(kohya).lora_config_kwargs("unet")
    assert kwargs["rank_pattern"] == {"mid_block.attentions.0.proj_out": 2}
    assert kwargs["alpha_pattern"] == {"mid_block.attentions.0.proj_out": 1.0}

    rs_ranks, rs_alphas = lora_config_values(
        peft, LoraConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"proj_out": 2})
    )
    assert rs_alphas["down_blocks.0.attentions.0.proj_in"] == pytest.approx(8 / 2 * 4)  # scale 8/sqrt(4)


def test_unmappable_keys_raise_clear_errors(trained: dict) -> None:
    dora = {**trained["unet"], "down_blocks.0.attentions.0.proj_in.lora_magnitude_vector": torch.ones(4)}
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        peft_to_kohya(dora, None, rank=RANK, alpha=ALPHA)
    with pytest.raises(ValueError, match="rank=8 was given but lora_A has 4 rows"):
        peft_to_kohya(trained["unet"], None, rank=8, alpha=ALPHA)
    with pytest.raises(KeyError, match="no value for unet module"):
        peft_to_kohya(trained["unet"], None, rank=RANK, alpha={"nothing.matches": 1.0})
    with pytest.raises(ValueError, match="hada_w1_a"):
        kohya_to_peft({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.ones(1)})
    odd = {
        "lora_unet_my_custom_block_0_to_q.lora_down.weight": torch.ones(1, 1),
        "lora_unet_my_custom_block_0_to_q.lora_up.weight": torch.ones(1, 1),
    }
    with pytest.raises(ValueError, match="cannot be split into SD 1.x module names"):
        kohya_to_peft(odd)
    with pytest.raises(ValueError, match="no unet module flattens to"):
        kohya_to_peft(odd, unet_module_names=trained["unet_names"])
    with pytest.raises(ValueError, match="SDXL"):
        kohya_to_peft({"lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)})


# ----------------------------------------------------------------------------- metadata


def test_kohya_metadata_keys(trained: dict) -> None:
    kohya = peft_to_kohya(trained["unet"], trained["te"], rank=RANK, alpha=ALPHA)
    meta = kohya_metadata(
        rank=RANK,
        alpha=ALPHA,
        title="My dog",
        output_name="my_dog",
        steps=800,
        seed=42,
        trigger_phrase="sks dog",
        training_comment="test",
        date="2024-05-01T00:00:00Z",
        tensors=kohya,
    )
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8.0")
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert (meta["ss_steps"], meta["ss_seed"], meta["ss_output_name"]) == ("800", "42", "my_dog")
    assert meta["ss_training_comment"] == "test" and meta["ss_resolution"] == "(512, 512)"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.title"] == "My dog" and meta["modelspec.trigger_phrase"] == "sks dog"
    assert meta["modelspec.resolution"] == "512x512" and meta["modelspec.date"] == "2024-05-01T00:00:00Z"
    assert all(isinstance(v, str) for v in meta.values())
    assert "ss_epoch" not in meta  # None values are left out
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]


# ----------------------------------------------------------------------------- files in diffusers


def test_diffusers_file_loads_at_trained_strength(
    trained: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    path = save_diffusers_lora(
        tmp_path / "final",
        trained["unet"],
        trained["te"],
        trained["unet_config"],
        trained["te_config"].to_dict(),
        metadata={"dreamtune.trainer": "lora"},
    )
    assert path.name == DIFFUSERS_LORA_WEIGHT_NAME
    tensors, meta = load_safetensors(path)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
    assert torch.equal(tensors["unet." + key], trained["unet"][key] * (ALPHA / RANK))  # alpha folded
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["unet.r"] == adapter["unet.lora_alpha"] == RANK
    assert meta["dreamtune.trainer"] == "lora"

    pipe = _pipeline(tiny_model_dir)
    pipe.load_lora_weights(path.parent)
    _assert_same_image(_render(pipe), trained)

    # Loaders that ignore diffusers' adapter metadata (ComfyUI, A1111, old diffusers) get it right too.
    bare = save_safetensors(tensors, tmp_path / "bare" / DIFFUSERS_LORA_WEIGHT_NAME)
    pipe = _pipeline(tiny_model_dir)
    pipe.load_lora_weights(bare.parent)
    _assert_same_image(_render(pipe), trained)


def test_kohya_file_loads_in_diffusers(trained: dict, tiny_model_dir: Path, tmp_path: Path) -> None:
    kohya = peft_to_kohya(trained["unet"], trained["te"], rank=RANK, alpha=ALPHA)
    path = save_safetensors(
        kohya,
        tmp_path / "my_dog.safetensors",
        kohya_metadata(rank=RANK, alpha=ALPHA, title="my_dog", tensors=kohya),
    )
    assert read_metadata(path)["ss_network_alpha"] == "8.0"
    pipe = _pipeline(tiny_model_dir)
    pipe.load_lora_weights(str(path))
    _assert_same_image(_render(pipe), trained)


def test_kohya_file_back_into_peft(trained: dict, tiny_model_dir: Path) -> None:
    """A kohya file rebuilt as PEFT adapters (lora_config_kwargs + set_peft_model_state_dict)."""
    kohya = peft_to_kohya(trained["unet"], trained["te"], rank=RANK, alpha=ALPHA)
    lora: KohyaLora = kohya_to_peft(kohya)
    pipe = _pipeline(tiny_model_dir)
    for model, part, state in (
        (pipe.unet, "unet", lora.unet),
        (pipe.text_encoder, "text_encoder", lora.text_encoder),
    ):
        model.add_adapter(LoraConfig(**lora.lora_config_kwargs(part)))
        set_peft_model_state_dict(model, state)
    _assert_same_image(_render(pipe), trained)


def test_diffusers_file_keeps_per_module_rank_and_alpha(tiny_model_dir: Path, tmp_path: Path) -> None:
    """rank_pattern/alpha_pattern survive: alpha folded per module, ranks declared in the metadata."""
    pipe = _pipeline(tiny_model_dir)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_v", "proj_in"],
        init_lora_weights="gaussian",
        rank_pattern={"proj_in": 2},
        alpha_pattern={"attn2.to_v": 1, "proj_in": 16},
    )
    torch.manual_seed(3)
    pipe.unet.add_adapter(config)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    reference = _render(pipe)
    path = save_diffusers_lora(tmp_path, get_peft_model_state_dict(pipe.unet), None, config)
    adapter = json.loads(read_metadata(path)["lora_adapter_metadata"])
    assert (
        adapter["unet.rank_pattern"]
        == adapter["unet.alpha_pattern"]
        == {
            "down_blocks.0.attentions.0.proj_in": 2,
            "down_blocks.0.attentions.1.proj_in": 2,
            "mid_block.attentions.0.proj_in": 2,
            "up_blocks.1.attentions.0.proj_in": 2,
            "up_blocks.1.attentions.1.proj_in": 2,
            "up_blocks.1.attentions.2.proj_in": 2,
        }
    )
    fresh = _pipeline(tiny_model_dir)
    fresh.load_lora_weights(tmp_path)
    np.testing.assert_allclose(_render(fresh), reference, atol=1e-4)
