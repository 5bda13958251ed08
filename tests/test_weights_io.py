"""safetensors I/O: atomic writes, metadata as strings, pickles refused unless allowed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from dreamtune.weights import safetensors_io
from dreamtune.weights.safetensors_io import (
    content_sha256,
    load_safetensors,
    modelspec_metadata,
    read_metadata,
    save_safetensors,
)


def test_round_trip_coerces_metadata_and_handles_views(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"t": base.t(), "row": base[1], "same": base}  # non-contiguous, view, shared storage
    path = save_safetensors(tensors, tmp_path / "w.safetensors", {"steps": 5, "ok": True, "skip": None})
    loaded, meta = load_safetensors(path)
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value)
    assert meta == {"steps": "5", "ok": "True"}
    assert read_metadata(path) == meta


def test_failed_write_leaves_no_file_and_keeps_old_one(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "w.safetensors"

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors({"a": torch.ones(2)}, target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []

    target.write_bytes(b"previous")
    with pytest.raises(OSError):
        save_safetensors({"a": torch.ones(2)}, target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_refused_with_clear_message(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    torch.save({"a": torch.ones(2)}, path)
    with pytest.raises(ValueError) as err:
        load_safetensors(path)
    message = str(err.value)
    assert str(path) in message and "allow_pickle=True" in message and "--allow-pickle" in message


def test_allow_pickle_loads_and_unwraps_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2, 2)}, "global_step": 7}, path)
    tensors, meta = load_safetensors(path, allow_pickle=True)
    assert list(tensors) == ["w"] and torch.equal(tensors["w"], torch.ones(2, 2))
    assert meta == {"global_step": "7"}


def test_allow_pickle_still_refuses_arbitrary_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"obj": Path("x")}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_safetensors(path, allow_pickle=True)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_safetensors(missing)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_metadata(missing)


def test_content_hash_is_sha256_of_tensor_bytes(tmp_path: Path) -> None:
    tensors = {"b": torch.randn(3, 5), "a": torch.randn(7).half()}
    path = save_safetensors(tensors, tmp_path / "h.safetensors", {"any": "metadata"})
    blob = path.read_bytes()
    header_len = int.from_bytes(blob[:8], "little")
    assert content_sha256(tensors) == hashlib.sha256(blob[8 + header_len :]).hexdigest()


def test_modelspec_metadata_formats() -> None:
    meta = modelspec_metadata(
        architecture="stable-diffusion-v1/lora",
        implementation="diffusers",
        title="t",
        resolution=512,
        date="2024-01-02",
    )
    assert meta == {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "t",
        "modelspec.resolution": "512x512",
        "modelspec.date": "2024-01-02",
    }


def test_corrupt_file_error_names_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_safetensors(path)


def test_written_file_gets_the_usual_mode(tmp_path: Path) -> None:
    import os

    mask = os.umask(0o022)
    try:
        path = save_safetensors({"a": torch.ones(1)}, tmp_path / "m.safetensors")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
