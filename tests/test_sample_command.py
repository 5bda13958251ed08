"""`dreamtune sample` with several LoRAs at their own weights and embeddings (diffusers and A1111)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamtune.cli import main
from dreamtune.weights.diffusers_folder import read_config
from dreamtune.weights.ldm_keys import unet_key_map
from dreamtune.weights.lora_keys import kohya_name
from dreamtune.weights.safetensors_io import save_safetensors


def _kohya_lora(model_dir: Path, path: Path, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    unet_map = unet_key_map(read_config(model_dir, "unet"))
    tensors = {}
    for key, shape in unet_map.shapes.items():
        if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            name = kohya_name(key.removesuffix(".weight"), "unet")
            tensors[f"{name}.lora_down.weight"] = torch.randn(4, shape[1], generator=generator)
            tensors[f"{name}.lora_up.weight"] = torch.randn(shape[0], 4, generator=generator)
            tensors[f"{name}.alpha"] = torch.tensor(4.0)
    return Path(save_safetensors(tensors, path))


@pytest.fixture
def extras(tiny_model_dir, tmp_path):
    embedding = save_safetensors({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(3))},
                                 tmp_path / "mytoken.safetensors")
    return (_kohya_lora(tiny_model_dir, tmp_path / "a.safetensors", 1),
            _kohya_lora(tiny_model_dir, tmp_path / "b.safetensors", 2), Path(embedding))


def test_loras_get_their_own_weights_and_an_a1111_embedding_its_file_name(tiny_model_dir, extras):
    from diffusers import StableDiffusionPipeline

    from dreamtune.commands.sample import load_extras

    lora_a, lora_b, embedding = extras
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    loaded = load_extras(pipe, [f"{lora_a}:0.5", str(lora_b)], [str(embedding)], default_scale=0.8)
    assert loaded == ["a x0.5", "b x0.8", "embedding mytoken"]
    assert pipe.get_active_adapters() == ["lora0", "lora1"]
    scales = {name: layer.scaling for name, layer in pipe.unet.named_modules() if name.endswith("attn2.to_k")}
    assert all(s == {"lora0": 0.5, "lora1": 0.8} for s in scales.values()), scales
    assert "mytoken" in pipe.tokenizer.get_vocab()


def test_sample_grid_puts_the_base_beside_the_extras(tiny_model_dir, extras, tmp_path, capsys):
    lora_a, _, embedding = extras
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tiny_model_dir), "--prompt", "a photo of mytoken", "--lora", f"{lora_a}:2",
                 "--embedding", str(embedding), "--with-base", "--out", str(out), "--steps", "2",
                 "--images-per-prompt", "1", "--resolution", "32", "--guidance-scale", "1"]) == 0
    grid = np.asarray(Image.open(out).convert("RGB")).astype(int)
    label = 14
    base, extra = grid[label:label + 32], grid[2 * label + 32:2 * label + 64]
    assert grid.shape[0] == 2 * (32 + label) and np.abs(base - extra).mean() > 1
    assert main(["sample", "--model", str(tiny_model_dir), "--prompt", "x", "--lora", str(tmp_path / "nope.safetensors"),
                 "--out", str(out)]) == 2
    assert "--lora: " in capsys.readouterr().err


def test_sample_encodes_prompts_as_training_did(tiny_model_dir, tmp_path, monkeypatch):
    """--clip-skip 2 --max-token-length 150: the pipeline gets the same embeddings as training computes."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from dreamtune.models import render
    from dreamtune.models.text import encode_tokens, token_ids

    seen = []
    original = render.render_images

    def spy(pipe, prompts, **kwargs):
        seen.append(kwargs["encode"]("a photo of mytoken"))
        return original(pipe, prompts, **kwargs)

    monkeypatch.setattr(render, "render_images", spy)
    assert main(["sample", "--model", str(tiny_model_dir), "--prompt", "a photo of mytoken", "--clip-skip", "2",
                 "--max-token-length", "150", "--images-per-prompt", "1", "--steps", "1",
                 "--out", str(tmp_path / "grid.png")]) == 0
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder")
    with torch.no_grad():
        expected = encode_tokens(text_encoder, token_ids(tokenizer, ["a photo of mytoken"], 150), 2)
    assert len(seen) == 1 and seen[0].shape == (1, 152, text_encoder.config.hidden_size)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-5)
