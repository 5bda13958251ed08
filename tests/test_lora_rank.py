"""extract-lora and resize-lora: SVD per module, judged by merging the result back and by the singular values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dreamtune.cli import main
from dreamtune.weights.checkpoint import open_checkpoint
from dreamtune.weights.diffusers_folder import read_config
from dreamtune.weights.ldm_keys import TEXT_MODEL_PREFIX, unet_key_map
from dreamtune.weights.lora_files import read_lora
from dreamtune.weights.lora_rank import RankChoice, extract_lora
from dreamtune.weights.merge import lora_delta
from dreamtune.weights.safetensors_io import save_safetensors


@pytest.fixture(scope="module")
def tuned_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A 'fine-tune' of the tiny model: every UNet weight and the text encoder's layers moved (biases too)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder):
            for name, param in module.named_parameters():
                if "embeddings" not in name:
                    param.add_(0.01 * torch.randn(param.shape, generator=generator))
    out = tmp_path_factory.mktemp("tuned") / "model"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def test_full_rank_extract_merged_back_reproduces_the_fine_tune(tiny_model_dir, tuned_dir, tmp_path, capsys):
    lora, report = tmp_path / "extracted.safetensors", tmp_path / "report.json"
    assert main(["extract-lora", str(tiny_model_dir), str(tuned_dir), "--out", str(lora), "--rank", "100000",
                 "--text-encoder", "--dtype", "fp32", "--report", str(report), "--no-hash"]) == 0
    assert "not representable by a LoRA" in capsys.readouterr().out
    merged = tmp_path / "merged.safetensors"
    assert main(["merge-lora", str(tiny_model_dir), "--lora", str(lora), "--out", str(merged), "--no-hash"]) == 0

    left_out = set(json.loads(report.read_text())["not_representable"])
    with open_checkpoint(tuned_dir) as tuned, open_checkpoint(merged) as out, open_checkpoint(tiny_model_dir) as base:
        checked = 0
        for key in tuned.keys:
            if key in left_out:  # a bias or norm: the LoRA cannot carry it, so the merge keeps the base's
                assert torch.equal(out.get(key), base.get(key)), key
                continue
            torch.testing.assert_close(out.get(key), tuned.get(key), atol=2e-5, rtol=0, msg=key)
            checked += not torch.equal(tuned.get(key), base.get(key))
    assert checked > 100 and any(k.endswith(".bias") for k in left_out)
    assert all(k.startswith(TEXT_MODEL_PREFIX + "embeddings") or not k.startswith(TEXT_MODEL_PREFIX)
               or not k.endswith(("q_proj.weight", "fc1.weight")) for k in left_out)


def _sources(tiny_model_dir, tuned_dir):
    return open_checkpoint(tiny_model_dir), open_checkpoint(tuned_dir), unet_key_map(read_config(tiny_model_dir, "unet"))


def test_kept_energy_is_the_singular_values_share(tiny_model_dir, tuned_dir):
    base, tuned, unet_map = _sources(tiny_model_dir, tuned_dir)
    with base, tuned:
        tensors, reports, _ = extract_lora(base, tuned, unet_map, RankChoice(rank=2), dtype=torch.float32)
        for report in reports[:: max(1, len(reports) // 12)]:
            key = unet_map.to_single[report.module + ".weight"]
            delta = (tuned.get(key) - base.get(key)).flatten(1)
            squared = torch.linalg.svdvals(delta).double() ** 2
            assert report.rank == 2 and report.full_rank == squared.numel()
            assert report.energy == pytest.approx(float(squared[:2].sum() / squared.sum()), rel=1e-6)
    down = next(v for k, v in tensors.items() if k.endswith("conv1.lora_down.weight"))
    up = next(v for k, v in tensors.items() if k.endswith("conv1.lora_up.weight"))
    assert down.ndim == 4 and down.shape[0] == 2 and tuple(up.shape[1:]) == (2, 1, 1)


def test_energy_picks_the_smallest_rank_that_keeps_it(tiny_model_dir, tuned_dir):
    base, tuned, unet_map = _sources(tiny_model_dir, tuned_dir)
    with base, tuned:
        _, reports, _ = extract_lora(base, tuned, unet_map, RankChoice(energy=0.8))
        for report in reports[:: max(1, len(reports) // 12)]:
            key = unet_map.to_single[report.module + ".weight"]
            squared = torch.linalg.svdvals((tuned.get(key) - base.get(key)).flatten(1)).double() ** 2
            share = torch.cumsum(squared, 0) / squared.sum()
            assert share[report.rank - 1] >= 0.8 and (report.rank == 1 or share[report.rank - 2] < 0.8)
    with pytest.raises(ValueError, match="not both or neither"):
        RankChoice(rank=4, energy=0.9)


@pytest.fixture
def random_lora(tiny_model_dir, tmp_path) -> Path:
    """A kohya LoRA of rank 4, alpha 8, on the UNet's attention and a resnet conv, and the text encoder."""
    from dreamtune.weights.lora_keys import kohya_name

    generator = torch.Generator().manual_seed(1)
    unet_map = unet_key_map(read_config(tiny_model_dir, "unet"))
    shapes = {k.removesuffix(".weight"): s for k, s in unet_map.shapes.items()
              if k.endswith(("attn1.to_q.weight", "attn2.to_v.weight", "resnets.0.conv1.weight"))}
    shapes["encoder.layers.0.self_attn.q_proj"] = torch.Size([32, 32])
    tensors = {}
    for module, shape in shapes.items():
        name = kohya_name(module, "text_encoder" if module.startswith("encoder.") else "unet")
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, *shape[1:], generator=generator)
        up_shape = (shape[0], 4, 1, 1) if len(shape) == 4 else (shape[0], 4)
        tensors[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=generator)
        tensors[f"{name}.alpha"] = torch.tensor(8.0)
    return Path(save_safetensors(tensors, tmp_path / "random.safetensors"))


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    lora = read_lora(path)
    return {module: lora_delta(down, up, (up.shape[0], *down.shape[1:]), module) * lora.scale(module)
            for part in ("unet", "text_encoder") for module, (down, up) in lora.modules(part).items()}


def test_resize_at_the_original_rank_is_lossless_and_lower_ranks_report_their_energy(random_lora, tmp_path):
    same = tmp_path / "rank4.safetensors"
    assert main(["resize-lora", str(random_lora), "--out", str(same), "--rank", "4", "--dtype", "fp32",
                 "--no-hash"]) == 0
    original, resized = _deltas(random_lora), _deltas(same)
    assert set(original) == set(resized) and len(original) >= 4
    for module in original:
        torch.testing.assert_close(resized[module], original[module], atol=1e-4, rtol=1e-5)

    smaller, report = tmp_path / "rank2.safetensors", tmp_path / "report.json"
    assert main(["resize-lora", str(random_lora), "--out", str(smaller), "--rank", "2", "--report", str(report),
                 "--no-hash"]) == 0
    rows = {r["module"]: r for r in json.loads(report.read_text())["modules"]}
    for module, delta in original.items():
        squared = torch.linalg.svdvals(delta.flatten(1)).double() ** 2
        assert rows[module]["rank"] == 2 and rows[module]["old_rank"] == 4
        assert rows[module]["energy"] == pytest.approx(float(squared[:2].sum() / squared.sum()), rel=1e-5)
    assert read_lora(smaller).metadata["ss_network_dim"] == "2"


def test_extract_of_an_unchanged_model_is_refused(tiny_model_dir, tmp_path, capsys):
    assert main(["extract-lora", str(tiny_model_dir), str(tiny_model_dir), "--out", str(tmp_path / "x.safetensors"),
                 "--rank", "4"]) == 2
    assert "does not differ" in capsys.readouterr().err


@pytest.fixture(scope="module")
def word_tuned_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A fine-tune whose attention moved and whose token rows of 'sks' and 'dog' moved (as DreamBooth's text encoder)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if name.endswith("to_q.weight"):
                param.add_(0.01 * torch.randn(param.shape, generator=generator))
        rows = pipe.text_encoder.get_input_embeddings().weight
        for word in ("sks", "dog"):
            ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
            rows[ids] += 0.5 * torch.randn(len(ids), rows.shape[1], generator=generator)
    out = tmp_path_factory.mktemp("word-tuned") / "model"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def test_trigger_rows_travel_bundled_and_merge_back_into_the_word_only(tiny_model_dir, word_tuned_dir, tmp_path,
                                                                          capsys):
    from safetensors.torch import load_file

    from dreamtune.weights.bundled_words import TOKEN_EMBEDDING_KEY
    from dreamtune.weights.diffusers_folder import load_clip_tokenizer

    lora = tmp_path / "extracted.safetensors"
    assert main(["extract-lora", str(tiny_model_dir), str(word_tuned_dir), "--out", str(lora), "--rank", "4",
                 "--dtype", "fp32", "--trigger", "sks", "--no-hash"]) == 0
    tokenizer = load_clip_tokenizer(tiny_model_dir / "tokenizer")
    sks = tokenizer("sks", add_special_tokens=False).input_ids
    dog = tokenizer("dog", add_special_tokens=False).input_ids
    tensors = load_file(str(lora))
    with open_checkpoint(word_tuned_dir) as tuned, open_checkpoint(tiny_model_dir) as base:
        tuned_rows, base_rows = tuned.get(TOKEN_EMBEDDING_KEY), base.get(TOKEN_EMBEDDING_KEY)
    assert torch.equal(tensors["bundle_emb.sks.string_to_param.*"], tuned_rows[sks])  # A1111's key, one vector a token
    assert read_lora(lora).modules("unet")  # the LoRA part reads as before

    merged = tmp_path / "merged.safetensors"
    assert main(["merge-lora", str(tiny_model_dir), "--lora", f"{lora}:0.5", "--out", str(merged), "--no-hash"]) == 0
    assert "written into the token embedding: sks" in capsys.readouterr().out
    with open_checkpoint(merged) as out:
        rows = out.get(TOKEN_EMBEDDING_KEY)
    assert torch.equal(rows[sks], tuned_rows[sks])  # whole, whatever the LoRA's strength (as A1111 applies it)
    assert torch.equal(rows[dog], base_rows[dog])  # not asked for
    others = [i for i in range(rows.shape[0]) if i not in sks]
    assert torch.equal(rows[others], base_rows[others])


def test_a_new_words_bundle_is_not_merged_and_an_unmoved_trigger_is_refused(tiny_model_dir, word_tuned_dir, tmp_path,
                                                                            capsys):
    from dreamtune.weights.bundled_words import TOKEN_EMBEDDING_KEY

    assert main(["extract-lora", str(tiny_model_dir), str(word_tuned_dir), "--out", str(tmp_path / "x.safetensors"),
                 "--rank", "2", "--trigger", "cat", "--no-hash"]) != 0
    assert "--trigger 'cat': its token rows are the same" in capsys.readouterr().err

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    with open_checkpoint(tiny_model_dir) as base:
        width = base.shape(TOKEN_EMBEDDING_KEY)[1]
        q = base.shape(next(k for k in base.keys if "input_blocks.1.1.transformer_blocks.0.attn1.to_q" in k))
        base_rows = base.get(TOKEN_EMBEDDING_KEY)
    pivotal = save_safetensors({f"{name}.lora_down.weight": torch.zeros(2, q[1]),
                                f"{name}.lora_up.weight": torch.zeros(q[0], 2), f"{name}.alpha": torch.tensor(2.0),
                                "bundle_emb.<s0>.string_to_param.*": torch.ones(1, width)},
                               tmp_path / "pivotal.safetensors")
    merged = tmp_path / "merged.safetensors"
    assert main(["merge-lora", str(tiny_model_dir), "--lora", str(pivotal), "--out", str(merged), "--no-hash"]) == 0
    assert "bundled embedding '<s0>' not merged: the tokenizer spells '<s0>' with" in capsys.readouterr().out
    with open_checkpoint(merged) as out:
        assert torch.equal(out.get(TOKEN_EMBEDDING_KEY), base_rows)
