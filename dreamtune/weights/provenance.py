"""Provenance for written files: which command made them, from which inputs (with their sha256), how."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .safetensors_io import PathLike


def file_sha256(path: PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (the hash A1111/Civitai show as 'SHA256'/AutoV2)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def input_sha256(path: PathLike) -> str:
    """File sha256; for a folder, sha256 of the sorted ``relpath:sha256`` lines of its weight files."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    lines = [f"{f.relative_to(p).as_posix()}:{file_sha256(f)}" for f in sorted(p.rglob("*"))
             if f.is_file() and f.suffix in (".safetensors", ".bin", ".ckpt", ".pt")]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def provenance(command: str, inputs: Iterable[PathLike], settings: Mapping[str, Any],
               hash_inputs: bool = True) -> dict[str, str]:
    """Metadata naming the command, the inputs (with file sha256, see :func:`input_sha256`) and its settings."""
    paths = [Path(p) for p in inputs]
    meta = {
        "dreamtune.command": f"dreamtune {command}",
        "dreamtune.inputs": json.dumps([p.name for p in paths]),
        "dreamtune.settings": json.dumps(dict(settings), sort_keys=True, default=str),
    }
    if hash_inputs:
        meta["dreamtune.inputs_file_sha256"] = json.dumps([input_sha256(p) for p in paths])
    return meta
