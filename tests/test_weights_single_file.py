"""SD 1.x single-file checkpoint <-> diffusers: complete key maps, bitwise round trips, loaders.

The tiny model has a 2-level UNet and a 3-level VAE with one resnet per encoder level: exactly
the shapes that a converter hard-coding SD 1.5's layout gets wrong. SD 1.5 itself is checked on
the meta device (shapes only, no memory) from the configs we ship.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamtune.weights.ldm_keys import KeyMapError, unet_key_map, vae_key_map
from dreamtune.weights.diffusers_folder import SD1_CONFIG_DIR, sd1_tokenizer
from dreamtune.weights.safetensors_io import load_safetensors
from dreamtune.weights.single_file import (
    HARMLESS_KEYS,
    SingleFileError,
    detect_layout,
    diffusers_to_single_file,
    load_single_file_pipeline,
    save_single_file,
    single_file_to_diffusers,
)

TE = "cond_stage_model.transformer.text_model."
PREFIXES = ("model.diffusion_model.", "first_stage_model.", TE)


def _config(folder: Path, component: str) -> dict:
    """Read one component's config.json from a diffusers folder."""
    return json.loads((Path(folder) / component / "config.json").read_text())


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir):
    """The tiny diffusers pipeline, loaded from the session's folder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_sds(tiny_pipe):
    """(unet, vae, text_encoder) diffusers state dicts of the tiny model."""
    return tuple(m.state_dict() for m in (tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder))


@pytest.fixture(scope="module")
def tiny_cfgs(tiny_model_dir):
    """(unet_config, vae_config) of the tiny model."""
    return _config(tiny_model_dir, "unet"), _config(tiny_model_dir, "vae")


@pytest.fixture(scope="module")
def tiny_single(tiny_sds, tiny_cfgs):
    """The tiny model as an fp32 single-file state dict."""
    return diffusers_to_single_file(*tiny_sds, *tiny_cfgs, dtype=None)


@pytest.fixture(scope="module")
def tiny_configs_only(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny folder's configs and tokenizer without any weight file: weights must come from
    the single file."""
    out = tmp_path_factory.mktemp("tiny-configs")
    for src in Path(tiny_model_dir).rglob("*.json"):
        dst = out / src.relative_to(tiny_model_dir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    return out


@pytest.fixture(scope="module")
def tiny_file(tiny_pipe, tmp_path_factory) -> Path:
    """The tiny model saved as an fp32 single-file .safetensors."""
    return save_single_file(tiny_pipe, tmp_path_factory.mktemp("single") / "tiny.safetensors",
                            dtype=None)


# ------------------------------------------------------------------------------------------
# key maps on the tiny model
# ------------------------------------------------------------------------------------------


def test_every_tiny_key_maps_nothing_dropped(tiny_sds, tiny_single):
    unet, vae, text = tiny_sds
    assert len(tiny_single) == len(unet) + len(vae) + len(text)
    assert all(k.startswith(PREFIXES) for k in tiny_single)
    counts = [sum(k.startswith(p) for k in tiny_single) for p in PREFIXES]
    assert counts == [len(unet), len(vae), len(text)]


def test_tiny_unet_spot_checks(tiny_sds, tiny_single):
    unet = tiny_sds[0]
    mdm = "model.diffusion_model."
    # 2 levels x (2 + 1) up resnets -> output_blocks 0..5; the last one has a skip connection.
    assert torch.equal(tiny_single[mdm + "output_blocks.5.0.skip_connection.weight"],
                       unet["up_blocks.1.resnets.2.conv_shortcut.weight"])
    assert not any(k.startswith(mdm + "output_blocks.6.") for k in tiny_single)
    assert not any(k.startswith(mdm + "input_blocks.6.") for k in tiny_single)
    # Level 0 is CrossAttnDownBlock2D (attention at .1), level 1 DownBlock2D (none).
    assert mdm + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in tiny_single
    assert not any(k.startswith(mdm + "input_blocks.4.1.") for k in tiny_single)
    assert torch.equal(tiny_single[mdm + "input_blocks.3.0.op.weight"],
                       unet["down_blocks.0.downsamplers.0.conv.weight"])
    # up_blocks.0 is UpBlock2D: its upsampler sits at slot 1; up_blocks.1 (last) has none.
    assert torch.equal(tiny_single[mdm + "output_blocks.2.1.conv.weight"],
                       unet["up_blocks.0.upsamplers.0.conv.weight"])
    assert mdm + "output_blocks.3.1.proj_in.weight" in tiny_single
    for ldm, hf in [("time_embed.0.weight", "time_embedding.linear_1.weight"),
                    ("time_embed.2.bias", "time_embedding.linear_2.bias"),
                    ("input_blocks.0.0.weight", "conv_in.weight"),
                    ("middle_block.1.proj_out.weight", "mid_block.attentions.0.proj_out.weight"),
                    ("middle_block.2.out_layers.3.weight", "mid_block.resnets.1.conv2.weight"),
                    ("out.0.weight", "conv_norm_out.weight"), ("out.2.bias", "conv_out.bias")]:
        assert torch.equal(tiny_single[mdm + ldm], unet[hf]), ldm


def test_tiny_vae_and_text_spot_checks(tiny_sds, tiny_single):
    _, vae, text = tiny_sds
    fsm = "first_stage_model."
    # 3 levels: LDM decoder.up.0 is diffusers' last up block (reversed index).
    assert torch.equal(tiny_single[fsm + "decoder.up.0.block.0.conv1.weight"],
                       vae["decoder.up_blocks.2.resnets.0.conv1.weight"])
    assert torch.equal(tiny_single[fsm + "decoder.up.2.upsample.conv.weight"],
                       vae["decoder.up_blocks.0.upsamplers.0.conv.weight"])
    assert fsm + "decoder.up.0.upsample.conv.weight" not in tiny_single
    assert torch.equal(tiny_single[fsm + "encoder.down.1.block.0.nin_shortcut.weight"],
                       vae["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"])
    assert fsm + "encoder.norm_out.weight" in tiny_single
    assert fsm + "quant_conv.weight" in tiny_single
    # VAE attention: Linear [C, C] in diffusers, 1x1 conv [C, C, 1, 1] in the single file.
    q = tiny_single[fsm + "encoder.mid.attn_1.q.weight"]
    assert q.shape == (32, 32, 1, 1)
    assert torch.equal(q[:, :, 0, 0], vae["encoder.mid_block.attentions.0.to_q.weight"])
    assert tiny_single[fsm + "decoder.mid.attn_1.proj_out.weight"].ndim == 4
    assert tiny_single[fsm + "decoder.mid.attn_1.proj_out.bias"].ndim == 1
    assert fsm + "decoder.mid.attn_1.norm.weight" in tiny_single
    hf = ("text_model." if any(k.startswith("text_model.") for k in text) else "")
    assert torch.equal(tiny_single[TE + "encoder.layers.0.self_attn.q_proj.weight"],
                       text[hf + "encoder.layers.0.self_attn.q_proj.weight"])


# ------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------


def _assert_bitwise(a: dict, b: dict) -> None:
    """Same keys, and every tensor equal in dtype, shape and bits."""
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_single_to_diffusers_to_single_is_bitwise(tiny_single, tiny_cfgs):
    back = single_file_to_diffusers(tiny_single, *tiny_cfgs)
    _assert_bitwise(diffusers_to_single_file(*back, *tiny_cfgs, dtype=None), tiny_single)


def test_diffusers_to_single_to_diffusers_is_bitwise(tiny_sds, tiny_single, tiny_cfgs):
    for got, want in zip(single_file_to_diffusers(tiny_single, *tiny_cfgs), tiny_sds):
        _assert_bitwise(got, want)


def test_text_encoder_naming_accepted_both_ways(tiny_sds, tiny_single, tiny_cfgs, tiny_model_dir):
    from transformers import CLIPTextConfig, CLIPTextModel

    unet, vae, text = tiny_sds
    stripped = {k.removeprefix("text_model."): v for k, v in text.items()}
    prefixed = {"text_model." + k: v for k, v in stripped.items()}
    for variant in (stripped, prefixed):
        _assert_bitwise(diffusers_to_single_file(unet, vae, variant, *tiny_cfgs, dtype=None),
                        tiny_single)
    # Older files without the text_model level read the same; output follows installed naming.
    old = {k.replace(TE, "cond_stage_model.transformer."): v for k, v in tiny_single.items()}
    _, _, got = single_file_to_diffusers(old, *tiny_cfgs)
    _assert_bitwise(got, text)
    with torch.device("meta"):
        installed = CLIPTextModel(CLIPTextConfig.from_dict(_config(tiny_model_dir, "text_encoder")))
    assert set(got) == set(installed.state_dict())


def test_save_writes_fp16_and_modelspec_metadata(tiny_pipe, tmp_path):
    path = save_single_file(tiny_pipe, tmp_path / "model.safetensors",
                            metadata={"modelspec.title": "My dog", "dreamtune.steps": 800})
    tensors, meta = load_safetensors(path)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.title"] == "My dog" and meta["dreamtune.steps"] == "800"
    assert detect_layout(tensors) == "single_file"


def test_dict_of_components_and_fp16_pipeline(tiny_pipe, tiny_file, tiny_model_dir, tmp_path):
    parts = {"unet": tiny_pipe.unet, "vae": tiny_pipe.vae, "text_encoder": tiny_pipe.text_encoder}
    path = save_single_file(parts, tmp_path / "parts.safetensors", dtype=None)
    _assert_bitwise(load_safetensors(path)[0], load_safetensors(tiny_file)[0])
    pipe = load_single_file_pipeline(path, config_dir=tiny_model_dir, torch_dtype=torch.float16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16


# ------------------------------------------------------------------------------------------
# the three loaders give the same images
# ------------------------------------------------------------------------------------------


def _image(pipe) -> np.ndarray:
    """Two denoising steps from a fixed seed, as a float array."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe("a photo of sks dog", num_inference_steps=2, generator=generator,
                height=32, width=32, output_type="np").images


def test_our_loader_and_diffusers_from_single_file_match_the_folder(tiny_pipe, tiny_file,
                                                                    tiny_configs_only):
    """diffusers 0.42's *loader* maps this 2-level/3-level file correctly (checked bitwise here).

    The known trap is the export direction: diffusers has no in-library
    diffusers -> single-file writer, and its repository script
    (scripts/convert_diffusers_to_original_stable_diffusion.py) hard-codes ``range(4)`` levels and
    3 up resnets and leaves unmatched keys under their diffusers names. Our writer is what makes
    the file correct; this test proves the file is what diffusers' reader expects.
    """
    from diffusers import StableDiffusionPipeline

    ours = load_single_file_pipeline(tiny_file, config_dir=tiny_configs_only)
    theirs = StableDiffusionPipeline.from_single_file(
        str(tiny_file), config=str(tiny_configs_only), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        want = getattr(tiny_pipe, name).state_dict()
        _assert_bitwise(getattr(ours, name).state_dict(), want)
        _assert_bitwise(getattr(theirs, name).state_dict(), want)
    reference = _image(tiny_pipe)
    assert reference.std() > 0
    np.testing.assert_array_equal(_image(ours), reference)
    np.testing.assert_array_equal(_image(theirs), reference)


# ------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------


def test_unmapped_key_raises_naming_it(tiny_sds, tiny_single, tiny_cfgs):
    bad = "model.diffusion_model.output_blocks.6.0.in_layers.0.weight"
    with pytest.raises(SingleFileError, match=r"output_blocks\.6\.0\.in_layers"):
        single_file_to_diffusers({**tiny_single, bad: torch.zeros(1)}, *tiny_cfgs)
    with pytest.raises(SingleFileError, match="lora_unet_foo"):
        single_file_to_diffusers({**tiny_single, "lora_unet_foo.alpha": torch.tensor(1.0)},
                                 *tiny_cfgs)
    unet, _, _ = single_file_to_diffusers(
        {**tiny_single, "extra.thing": torch.zeros(1)}, *tiny_cfgs, ignore_prefixes=("extra.",))
    assert len(unet) == len(tiny_sds[0])


def test_known_harmless_extras_are_ignored(tiny_sds, tiny_single, tiny_cfgs):
    extras = {key: torch.zeros(3) for key in HARMLESS_KEYS}
    extras[TE + "embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    extras["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(3)
    got = single_file_to_diffusers({**tiny_single, **extras}, *tiny_cfgs)
    assert [len(sd) for sd in got] == [len(sd) for sd in tiny_sds]


def test_missing_or_extra_weights_raise(tiny_sds, tiny_single, tiny_cfgs):
    gone = "first_stage_model.decoder.up.0.block.1.conv2.weight"
    partial = {k: v for k, v in tiny_single.items() if k != gone}
    with pytest.raises(SingleFileError, match=r"decoder\.up_blocks\.2\.resnets\.1\.conv2\.weight"):
        single_file_to_diffusers(partial, *tiny_cfgs)
    unet, vae, text = tiny_sds
    with pytest.raises(SingleFileError, match="down_blocks.9.bogus"):
        diffusers_to_single_file({**unet, "down_blocks.9.bogus": torch.zeros(1)}, vae, text,
                                 *tiny_cfgs)
    with pytest.raises(SingleFileError, match="conv_in.bias"):
        diffusers_to_single_file({k: v for k, v in unet.items() if k != "conv_in.bias"}, vae,
                                 text, *tiny_cfgs)
    with pytest.raises(SingleFileError, match="pooler"):
        diffusers_to_single_file(unet, vae, {**text, "pooler.weight": torch.zeros(1)}, *tiny_cfgs)


def test_wrong_config_is_refused(tiny_single, tiny_cfgs, tiny_file):
    unet_cfg, vae_cfg = tiny_cfgs
    shrunk = dict(tiny_single)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    shrunk[key] = shrunk[key][:, :3]
    with pytest.raises(SingleFileError, match=r"conv_in\.weight.*shape"):
        single_file_to_diffusers(shrunk, unet_cfg, vae_cfg)
    with pytest.raises(SingleFileError, match="missing"):
        single_file_to_diffusers(tiny_single, _config(SD1_CONFIG_DIR, "unet"), vae_cfg)
    with pytest.raises(SingleFileError, match="config"):
        load_single_file_pipeline(tiny_file)  # default: SD 1.5 configs


def test_sd2_and_sdxl_files_are_refused(tiny_single, tiny_cfgs):
    sd2 = {**tiny_single, "cond_stage_model.model.token_embedding.weight": torch.zeros(1)}
    with pytest.raises(SingleFileError, match=r"2\.x.*SD 1\.x only"):
        single_file_to_diffusers(sd2, *tiny_cfgs)
    sdxl = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": torch.zeros(1),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    with pytest.raises(SingleFileError, match="XL"):
        single_file_to_diffusers(sdxl, *tiny_cfgs)
    assert detect_layout(sd2) == "single_file_sd2" and detect_layout(sdxl) == "single_file_sdxl"


def test_detect_layout_of_diffusers_components(tiny_sds):
    assert [detect_layout(sd) for sd in tiny_sds] == [
        "diffusers_unet", "diffusers_vae", "diffusers_text_encoder"]
    assert detect_layout({"emb_params": None}) == "unknown"


def test_unsupported_unet_config_is_refused(tiny_cfgs):
    unet_cfg, vae_cfg = tiny_cfgs
    with pytest.raises(KeyMapError, match="AttnDownBlock2D"):
        unet_key_map({**unet_cfg, "down_block_types": ["AttnDownBlock2D", "DownBlock2D"]})
    with pytest.raises(KeyMapError, match="class_embed_type"):
        unet_key_map({**unet_cfg, "class_embed_type": "timestep"})
    with pytest.raises(KeyMapError, match="VAE"):
        vae_key_map({**vae_cfg, "down_block_types": ["DownEncoderBlock2D"] * 2})


def test_pickled_checkpoint_needs_opt_in(tiny_single, tiny_model_dir, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {**tiny_single, "alphas_cumprod": torch.ones(1000)}}, ckpt)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_single_file_pipeline(ckpt, config_dir=tiny_model_dir)
    pipe = load_single_file_pipeline(ckpt, config_dir=tiny_model_dir, allow_pickle=True)
    conv_in = tiny_single["model.diffusion_model.input_blocks.0.0.weight"]
    assert torch.equal(pipe.unet.conv_in.weight, conv_in)


# ------------------------------------------------------------------------------------------
# map derived from the config, not hard-coded: uneven depths and SD 1.5 on the meta device
# ------------------------------------------------------------------------------------------


def _meta_state_dicts(folder: Path, unet_cfg=None, vae_cfg=None):
    """UNet, VAE and CLIP text state dicts with the folder's shapes, on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg = unet_cfg or _config(folder, "unet")
    vae_cfg = vae_cfg or _config(folder, "vae")
    text_cfg = CLIPTextConfig.from_dict(_config(folder, "text_encoder"))
    with torch.device("meta"):
        models = (UNet2DConditionModel.from_config(unet_cfg), AutoencoderKL.from_config(vae_cfg),
                  CLIPTextModel(text_cfg))
    return [m.state_dict() for m in models], unet_cfg, vae_cfg


def _assert_same_shapes(a: dict, b: dict) -> None:
    """Same keys and shapes (meta tensors carry no values)."""
    assert set(a) == set(b)
    assert all(a[k].shape == b[k].shape for k in a)


def test_uneven_layers_and_transformer_depths_map_completely(tiny_model_dir):
    base = _config(tiny_model_dir, "unet")
    unet_cfg = {**base, "layers_per_block": [1, 3], "transformer_layers_per_block": [2, 1]}
    vae_cfg = {**_config(tiny_model_dir, "vae"), "layers_per_block": 2}
    sds, unet_cfg, vae_cfg = _meta_state_dicts(tiny_model_dir, unet_cfg, vae_cfg)
    single = diffusers_to_single_file(*sds, unet_cfg, vae_cfg, dtype=None)
    assert len(single) == sum(len(sd) for sd in sds)
    # level 0: resnet at input_blocks.1, downsampler at .2; level 1: three resnets at 3, 4, 5.
    mdm = "model.diffusion_model."
    assert mdm + "input_blocks.2.0.op.weight" in single
    assert mdm + "input_blocks.5.0.in_layers.0.weight" in single
    assert mdm + "output_blocks.5.1.transformer_blocks.1.attn1.to_q.weight" in single
    for got, want in zip(single_file_to_diffusers(single, unet_cfg, vae_cfg), sds):
        _assert_same_shapes(got, want)


def test_shipped_sd15_configs_cover_every_key():
    """The SD 1.5 map, built from the shipped configs, covers every key of the real layout."""
    sds, unet_cfg, vae_cfg = _meta_state_dicts(SD1_CONFIG_DIR)
    unet, vae, text = sds
    # The well-known SD 1.5 sizes: tensors and parameters per component.
    assert (len(unet), len(vae), len(text)) == (686, 248, 196)
    assert sum(t.numel() for t in unet.values()) == 859_520_964
    assert sum(t.numel() for t in vae.values()) == 83_653_863
    assert sum(t.numel() for t in text.values()) == 123_060_480
    single = diffusers_to_single_file(unet, vae, text, unet_cfg, vae_cfg, dtype=None)
    assert [sum(k.startswith(p) for k in single) for p in PREFIXES] == [686, 248, 196]
    for key in ("model.diffusion_model.output_blocks.11.0.skip_connection.weight",
                "model.diffusion_model.input_blocks.9.0.op.weight",
                "model.diffusion_model.output_blocks.2.1.conv.weight",
                "model.diffusion_model.output_blocks.8.2.conv.weight",
                "model.diffusion_model.input_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight",
                "first_stage_model.decoder.up.3.upsample.conv.bias",
                "first_stage_model.decoder.up.0.block.2.norm2.bias",
                "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight",
                TE + "encoder.layers.11.mlp.fc2.weight"):
        assert key in single, key
    assert single["first_stage_model.decoder.mid.attn_1.v.weight"].shape == (512, 512, 1, 1)
    # A real file carries position_ids (197 text keys) and schedule buffers: all harmless.
    extras = {TE + "embeddings.position_ids": torch.empty(1, 77, dtype=torch.long, device="meta"),
              "alphas_cumprod": torch.empty(1000, device="meta")}
    for got, want in zip(single_file_to_diffusers({**single, **extras}, unet_cfg, vae_cfg), sds):
        _assert_same_shapes(got, want)


def test_sd15_map_agrees_with_diffusers_reader():
    """Cross-check against diffusers' own LDM -> diffusers conversion (right for SD 1.5)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    sds, unet_cfg, vae_cfg = _meta_state_dicts(SD1_CONFIG_DIR)
    single = diffusers_to_single_file(*sds, unet_cfg, vae_cfg, dtype=None)
    theirs_unet = convert_ldm_unet_checkpoint(dict(single), unet_cfg)
    theirs_vae = convert_ldm_vae_checkpoint(dict(single), vae_cfg)
    ours_unet, ours_vae, _ = single_file_to_diffusers(single, unet_cfg, vae_cfg)
    assert set(theirs_unet) == set(ours_unet) and set(theirs_vae) == set(ours_vae)
    assert all(theirs_unet[k] is ours_unet[k] for k in ours_unet)  # the very same tensor
    _assert_same_shapes(theirs_vae, ours_vae)
    reshaped = {k for k in ours_vae if ".attentions.0.to_" in k and k.endswith(".weight")}
    assert len(reshaped) == 8
    assert all(theirs_vae[k] is ours_vae[k] for k in set(ours_vae) - reshaped)


# ------------------------------------------------------------------------------------------
# the shipped tokenizer
# ------------------------------------------------------------------------------------------


def test_shipped_tokenizer_is_clip_bpe():
    tok = sd1_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    # Reference ids of SD 1.x's tokenizer (as in Apple's ml-stable-diffusion tokenizer tests).
    ids = tok("a photo of an astronaut riding a horse on mars").input_ids
    assert ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_shipped_scheduler_and_model_index_are_valid_diffusers_configs():
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler.from_pretrained(SD1_CONFIG_DIR, subfolder="scheduler")
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.prediction_type == "epsilon" and scheduler.config.steps_offset == 1
    index = json.loads((SD1_CONFIG_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert index[name][1] and (SD1_CONFIG_DIR / name).is_dir(), name
    assert _config(SD1_CONFIG_DIR, "vae")["scaling_factor"] == 0.18215
