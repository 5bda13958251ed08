"""model.clip_skip and data.max_token_length: the conditioning equals a computation done by hand, in training,
the text cache and validation sampling, and the exports say how they were trained."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from dreamtune.errors import ConfigError
from dreamtune.models.text import encode_tokens, token_ids
from dreamtune.training.loop import Trainer

from .conftest import tiny_run_config

LONG = ", ".join(f"sks toy {word}" for word in ["red", "blue", "small", "large", "on a table", "in a box"] * 8)


@pytest.fixture(scope="module")
def text_models(tiny_model_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    return (CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer"),
            CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder").eval())


def without_last_layers(text_encoder, skipped: int):
    """The text encoder cut after its (layers - skipped)-th layer: its output is that layer through the final norm."""
    cut = copy.deepcopy(text_encoder)
    cut.encoder.layers = cut.encoder.layers[: len(cut.encoder.layers) - skipped]
    return cut


def by_hand(tokenizer, text_encoder, caption: str, clip_skip: int = 1) -> torch.Tensor:
    """One 77-token window, through the encoder cut ``clip_skip - 1`` layers short."""
    ids = tokenizer([caption], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return without_last_layers(text_encoder, clip_skip - 1)(ids).last_hidden_state


def test_clip_skip_2_is_the_penultimate_layer_through_the_final_norm(text_models):
    tokenizer, text_encoder = text_models
    ids = token_ids(tokenizer, ["a photo of sks toy"])
    with torch.no_grad():
        skip2, skip1 = encode_tokens(text_encoder, ids, 2), encode_tokens(text_encoder, ids, 1)
    expected = by_hand(tokenizer, text_encoder, "a photo of sks toy", clip_skip=2)
    torch.testing.assert_close(skip2, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(skip1, skip2, atol=1e-3)
    torch.testing.assert_close(skip1, by_hand(tokenizer, text_encoder, "a photo of sks toy"), rtol=0, atol=0)


@pytest.mark.parametrize("max_tokens", [150, 225])
def test_long_caption_windows_equal_each_window_encoded_alone(text_models, max_tokens):
    """kohya's convention: [BOS] + 75 tokens + [last token] per window, encoded alone, joined as BOS, each
    window's 75 inner positions, and the last window's final position."""
    tokenizer, text_encoder = text_models
    full = tokenizer([LONG]).input_ids[0]
    assert len(full) > max_tokens + 2, "the caption must be longer than the windows"
    kept = full[: max_tokens + 1] + [tokenizer.eos_token_id]  # truncation keeps EOS
    windows = [[kept[0], *kept[start : start + 75], kept[-1]] for start in range(1, max_tokens + 1, 75)]
    assert all(len(w) == 77 for w in windows)
    with torch.no_grad():
        alone = [text_encoder(torch.tensor([w])).last_hidden_state for w in windows]
        got = encode_tokens(text_encoder, token_ids(tokenizer, [LONG, "a photo"], max_tokens))
    expected = torch.cat([alone[0][:, :1], *[h[:, 1:76] for h in alone], alone[-1][:, 76:]], dim=1)
    assert got.shape == (2, max_tokens + 2, text_encoder.config.hidden_size)
    torch.testing.assert_close(got[:1], expected, rtol=0, atol=1e-6)
    with torch.no_grad():  # a short caption in a long run: its first window as usual, then padding windows
        short = text_encoder(tokenizer(["a photo"], padding="max_length", max_length=77,
                                       return_tensors="pt").input_ids).last_hidden_state
    torch.testing.assert_close(got[1:, :76], short[:, :76], rtol=0, atol=1e-6)


def test_clip_skip_beyond_the_layers_is_refused(tiny_model_dir, tmp_path):
    cfg = tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, "model.clip_skip=3", "train.max_steps=1")
    with pytest.raises(ConfigError, match=r"model\.clip_skip=3, but the text encoder has 2 layers"):
        Trainer(cfg).run()


def test_training_cache_sampling_and_exports_use_the_same_encoding(tiny_model_dir, tmp_path, monkeypatch,
                                                                   text_models):
    """clip_skip 2 with 150-token captions: the cached embedding (what the UNet trains on) and the embeddings
    the validation pipeline receives equal the hand computation; the kohya file records both settings."""
    from dreamtune.training import loop

    tokenizer, text_encoder = text_models
    captured = []
    original = loop.render_images

    def spy_render(pipe, *args, **kwargs):
        def spy_pipe(**call):
            captured.append(call)
            return pipe(**call)
        return original(spy_pipe, *args, **kwargs)

    monkeypatch.setattr(loop, "render_images", spy_render)
    cfg = tiny_run_config(
        "tiny_lora.yaml", tiny_model_dir, tmp_path, "model.clip_skip=2", "data.max_token_length=150",
        f"data.instance_prompt={LONG}", "data.ignore_captions=true", "data.cache_text_embeddings=true", "train.max_steps=2", "train.save_every=0",
        f"validation.prompts=['{LONG}']", "validation.num_inference_steps=1", "validation.images_per_prompt=1",
        "validation.negative_prompt=blurry",
    )
    trainer = Trainer(cfg)
    trainer.run()

    full = tokenizer([LONG]).input_ids[0]
    kept = full[:151] + [tokenizer.eos_token_id]
    cut = without_last_layers(text_encoder, 1)
    with torch.no_grad():
        alone = [cut(torch.tensor([[kept[0], *kept[s : s + 75], kept[-1]]])).last_hidden_state for s in (1, 76)]
    expected = torch.cat([alone[0][:, :1], alone[0][:, 1:76], alone[1][:, 1:76], alone[1][:, 76:]], dim=1)
    cached = trainer.text_cache.lookup([LONG])
    assert cached.shape == (1, 152, text_encoder.config.hidden_size)
    torch.testing.assert_close(cached, expected, rtol=0, atol=1e-5)
    assert len(captured) == 1 and "prompt" not in captured[0]
    torch.testing.assert_close(captured[0]["prompt_embeds"], expected, rtol=0, atol=1e-5)  # the LoRA on the UNet only
    with torch.no_grad():
        negative = encode_tokens(text_encoder, token_ids(tokenizer, ["blurry"], 150), 2)
    torch.testing.assert_close(captured[0]["negative_prompt_embeds"], negative, rtol=0, atol=1e-5)

    with safe_open(str(tmp_path / "final" / f"{cfg.output.name}.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_clip_skip"] == "2" and metadata["ss_max_token_length"] == "150"
    assert "clip skip 2, captions up to 150 tokens" in (tmp_path / "README.md").read_text()


def test_defaults_write_no_text_settings(tiny_model_dir, tmp_path):
    cfg = tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, "train.max_steps=1", "validation.prompts=[]")
    Trainer(cfg).run()
    with safe_open(str(tmp_path / "final" / f"{cfg.output.name}.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert "ss_clip_skip" not in metadata and "ss_max_token_length" not in metadata
