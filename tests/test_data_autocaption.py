"""`dreamtune caption`: BLIP writes sidecars (tiny random BLIP built locally), prefix, skip, overwrite."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image


def build_tiny_blip(folder: Path) -> Path:
    """A randomly initialised BLIP captioner with a tiny vocabulary, saved like a hub model."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "dog", "toy", "star"]
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]", model_max_length=32)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    config = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=5, sep_token_id=3,
                         pad_token_id=0, eos_token_id=3, encoder_hidden_size=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("blip") / "model")


def images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img_{i}.png"
        Image.new("RGB", (40, 30), (i * 40, 100, 200)).save(path)
        paths.append(path)
    return paths


def test_caption_command_writes_skips_and_overwrites(tiny_blip, tmp_path, capsys):
    from dreamtune.cli import main

    paths = images(tmp_path / "photos", 3)
    paths[0].with_suffix(".txt").write_text("kept caption\n", encoding="utf-8")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"")
    code = main(["caption", str(tmp_path / "photos"), "--model", str(tiny_blip), "--prefix", "sks",
                 "--batch-size", "2", "--max-new-tokens", "4"])
    assert code == 0
    assert paths[0].with_suffix(".txt").read_text(encoding="utf-8") == "kept caption\n"
    for path in paths[1:]:
        assert path.with_suffix(".txt").read_text(encoding="utf-8").startswith("sks")
    out = capsys.readouterr().out
    assert "2 written, 1 kept" in out and "1 failed" in out and "broken.jpg" in out

    code = main(["caption", str(tmp_path / "photos"), "--model", str(tiny_blip), "--overwrite",
                 "--max-new-tokens", "4"])
    assert code == 0
    assert paths[0].with_suffix(".txt").read_text(encoding="utf-8") != "kept caption\n"


def test_caption_command_names_a_missing_folder(tmp_path, capsys):
    from dreamtune.cli import main

    assert main(["caption", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
