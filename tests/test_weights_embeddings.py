"""Textual Inversion files: the three formats round-trip and load into a diffusers pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dreamtune.weights.embeddings import (
    load_embedding,
    save_a1111_embedding,
    save_a1111_pt,
    save_diffusers_embedding,
)
from dreamtune.weights.safetensors_io import load_safetensors, read_metadata

HIDDEN = 32  # the tiny text encoder's width (768 in SD 1.x)


@pytest.fixture
def vectors() -> torch.Tensor:
    return torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(0))


def _token_rows(pipe, token: str, n: int) -> torch.Tensor:
    """Embedding rows of ``token`` and the ``token_1 ...`` extras diffusers adds for multi-vector."""
    names = [token] + [f"{token}_{i}" for i in range(1, n)]
    ids = pipe.tokenizer.convert_tokens_to_ids(names)
    return pipe.text_encoder.get_input_embeddings().weight[ids].detach()


def test_diffusers_format_round_trip(tmp_path: Path, vectors: torch.Tensor) -> None:
    path = save_diffusers_embedding(tmp_path / "learned_embeds.safetensors", "<sks>", vectors)
    tensors, _ = load_safetensors(path)
    assert list(tensors) == ["<sks>"] and tensors["<sks>"].dtype == torch.float32
    loaded, token = load_embedding(path)
    assert token == "<sks>" and torch.equal(loaded, vectors)


def test_a1111_safetensors_round_trip(tmp_path: Path, vectors: torch.Tensor) -> None:
    path = save_a1111_embedding(tmp_path / "my_dog.safetensors", vectors, metadata={"ss_steps": 10})
    tensors, meta = load_safetensors(path)
    assert list(tensors) == ["emb_params"] and tensors["emb_params"].shape == (2, HIDDEN)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert meta["modelspec.title"] == "my_dog" and meta["ss_steps"] == "10"
    loaded, token = load_embedding(path)
    assert token is None and torch.equal(loaded, vectors)


def test_a1111_pt_round_trip_needs_allow_pickle(tmp_path: Path, vectors: torch.Tensor) -> None:
    path = save_a1111_pt(tmp_path / "my_dog.pt", vectors, name="my-dog", step=300)
    raw = torch.load(path, weights_only=True)
    assert raw["string_to_token"] == {"*": 265} and raw["name"] == "my-dog" and raw["step"] == 300
    assert torch.equal(raw["string_to_param"]["*"], vectors)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_embedding(path)
    loaded, token = load_embedding(path, allow_pickle=True)
    assert token == "my-dog" and torch.equal(loaded, vectors)


def test_dtype_option_and_single_vector(tmp_path: Path) -> None:
    one = torch.randn(HIDDEN)
    path = save_diffusers_embedding(tmp_path / "e.safetensors", "<x>", one, dtype=torch.float16)
    assert load_safetensors(path)[0]["<x>"].dtype == torch.float16
    loaded, _ = load_embedding(path)  # float32 by default
    assert loaded.shape == (1, HIDDEN) and loaded.dtype == torch.float32
    assert torch.allclose(loaded[0], one, atol=1e-2)
    assert load_embedding(path, dtype=torch.float16)[0].dtype == torch.float16


def test_a_single_vector_is_stored_as_one_row_in_every_format(tmp_path: Path) -> None:
    """The file itself holds [1, hidden]: InvokeAI and A1111 read the row count from the stored shape."""
    one = torch.randn(HIDDEN)
    stored = {
        "diffusers": load_safetensors(save_diffusers_embedding(tmp_path / "d.safetensors", "<x>", one))[0]["<x>"],
        "a1111": load_safetensors(save_a1111_embedding(tmp_path / "a.safetensors", one))[0]["emb_params"],
        "pt": torch.load(save_a1111_pt(tmp_path / "a.pt", one, name="a"), weights_only=True)["string_to_param"]["*"],
    }
    assert {kind: tuple(t.shape) for kind, t in stored.items()} == {kind: (1, HIDDEN) for kind in stored}


def test_not_an_embedding_is_refused(tmp_path: Path) -> None:
    from dreamtune.weights.safetensors_io import save_safetensors

    path = save_safetensors({"a": torch.ones(1, 4), "b": torch.ones(1, 4)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a textual-inversion embedding"):
        load_embedding(path)
    with pytest.raises(ValueError, match=r"\[n_vectors, hidden\]"):
        save_a1111_embedding(tmp_path / "bad.safetensors", torch.ones(1, 2, 3))


def test_files_load_into_diffusers(tiny_model_dir: Path, tmp_path: Path, vectors: torch.Tensor) -> None:
    from diffusers import StableDiffusionPipeline

    diffusers_file = save_diffusers_embedding(tmp_path / "learned_embeds.safetensors", "<sks>", vectors)
    a1111_file = save_a1111_embedding(tmp_path / "my_dog.safetensors", vectors, name="my_dog")
    legacy_file = save_a1111_pt(tmp_path / "old.pt", vectors, name="<old>")
    assert read_metadata(a1111_file)["modelspec.title"] == "my_dog"

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.load_textual_inversion(str(diffusers_file))
    pipe.load_textual_inversion(str(a1111_file), token="<dog>")
    pipe.load_textual_inversion(str(legacy_file))
    for token in ("<sks>", "<dog>", "<old>"):
        assert torch.equal(_token_rows(pipe, token, 2), vectors), token
