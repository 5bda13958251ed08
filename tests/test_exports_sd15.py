"""Exports at SD 1.5's real geometry: the single-file and kohya key sets and shapes the UIs' loaders require.

The model is `make-tiny-model --architecture sd15`'s, built on the meta device: seconds, no memory.
"""

from __future__ import annotations

import re

import pytest
import torch

#: SD 1.5's parameter counts (UNet 859.52 M, VAE 83.65 M, CLIP ViT-L/14 text encoder 123.06 M).
SD15_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
#: The 16 transformer blocks of SD 1.5's UNet (diffusers names), where the attention LoRA targets live.
SD15_ATTENTION_BLOCKS = (
    [f"down_blocks_{b}_attentions_{a}" for b in range(3) for a in range(2)] + ["mid_block_attentions_0"]
    + [f"up_blocks_{b}_attentions_{a}" for b in range(1, 4) for a in range(3)]
)


@pytest.fixture(scope="module")
def sd15():
    from dreamtune.models.tiny import build_sd15_pipeline

    return build_sd15_pipeline(device="meta")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd15_model_has_sd15_geometry(sd15):
    assert {name: count(getattr(sd15, name)) for name in SD15_PARAMETERS} == SD15_PARAMETERS
    assert len(sd15.tokenizer) == 49408


def test_single_file_at_sd15_size_has_every_key_the_uis_probe(sd15):
    from dreamtune.weights.single_file import diffusers_to_single_file, single_file_to_diffusers

    unet, vae, te = (getattr(sd15, n).state_dict() for n in ("unet", "vae", "text_encoder"))
    tensors = diffusers_to_single_file(unet, vae, te, dict(sd15.unet.config), dict(sd15.vae.config))
    assert len(tensors) == len(unet) + len(vae) + len(te)
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}
    shape = {k: tuple(v.shape) for k, v in tensors.items()}
    # InvokeAI: SD 1 when this key's last dimension is 768; the variant from input_blocks.0.0's 4 channels.
    assert shape["model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert shape["model.diffusion_model.input_blocks.0.0.weight"] == (320, 4, 3, 3)
    # The LDM layout: 12 input and 12 output blocks, middle_block.{0,1,2}, VAE attention as 1x1 convs.
    blocks = {(m.group(1), int(m.group(2))) for k in tensors
              if (m := re.match(r"model\.diffusion_model\.(input_blocks|output_blocks)\.(\d+)\.", k))}
    assert blocks == {(kind, i) for kind in ("input_blocks", "output_blocks") for i in range(12)}
    assert shape["model.diffusion_model.middle_block.1.proj_in.weight"] == (1280, 1280, 1, 1)
    assert shape["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    # The decoder levels run reversed: up.0 is the full-resolution one (128 channels), up.3 the 512-channel one.
    assert shape["first_stage_model.decoder.up.0.block.2.conv2.weight"] == (128, 128, 3, 3)
    assert shape["first_stage_model.decoder.up.3.block.2.conv2.weight"] == (512, 512, 3, 3)
    text = [k for k in tensors if k.startswith("cond_stage_model.")]
    assert text and all(k.startswith("cond_stage_model.transformer.text_model.") for k in text)
    assert shape["cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight"] == (768, 768)
    # Every key maps back: nothing dropped in either direction.
    back = single_file_to_diffusers(tensors, dict(sd15.unet.config), dict(sd15.vae.config))
    assert [set(part) for part in back] == [set(unet), set(vae), set(te)]


def test_kohya_lora_at_sd15_size_is_the_176_modules_uis_patch(sd15, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from dreamtune.weights.describe import describe
    from dreamtune.weights.lora_formats import peft_to_kohya
    from dreamtune.weights.safetensors_io import save_safetensors

    rank = 4
    sd15.unet.add_adapter(LoraConfig(r=rank, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    sd15.text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=8,
                                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    # The adapters' names and shapes from PEFT at full size; values drawn on the CPU (the modules are meta).
    unet_lora, te_lora = ({k: torch.randn(v.shape) for k, v in get_peft_model_state_dict(m).items()}
                          for m in (sd15.unet, sd15.text_encoder))
    kohya = peft_to_kohya(unet_lora, te_lora, rank=rank, alpha=8)
    modules = {k.split(".", 1)[0] for k in kohya}
    expected = ({f"lora_unet_{block}_transformer_blocks_0_attn{a}_{t}" for block in SD15_ATTENTION_BLOCKS
                 for a in (1, 2) for t in ("to_q", "to_k", "to_v", "to_out_0")}
                | {f"lora_te_text_model_encoder_layers_{i}_self_attn_{t}" for i in range(12)
                   for t in ("q_proj", "k_proj", "v_proj", "out_proj")})
    assert len(expected) == 176 and modules == expected
    assert set(kohya) == {f"{m}.{s}" for m in expected for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    cross = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert tuple(kohya[f"{cross}.lora_down.weight"].shape) == (rank, 768)  # InvokeAI's SD 1 test
    assert tuple(kohya[f"{cross}.lora_up.weight"].shape) == (320, rank)
    assert tuple(kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape) == (rank, 768)
    info = describe(save_safetensors(kohya, tmp_path / "sd15_lora.safetensors"))
    assert info["modules"] == {"unet": 128, "text_encoder": 48}
    assert all(v.startswith("yes") for v in info["loads_in"].values()), info["loads_in"]
    assert info["loads_in"]["InvokeAI"] == "yes"
