"""Named tensors read lazily, one at a time: safetensors files, allowed pickles, and views over them.

A :class:`TensorSource` maps names to tensors it reads on demand, so tools that walk a checkpoint
key by key (blend, merge, convert) never hold a whole input model in memory. How names are
chosen (a file's own keys, or canonical single-file names) is up to whoever opens the source.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import WeightsError
from .safetensors_io import PathLike, is_pickle_path, load_safetensors, read_safetensors_header

#: The safetensors header's dtype names.
_ST_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class SafetensorsReader:
    """Reads a ``.safetensors`` file tensor by tensor with ``pread`` (header parsed once, no mmap).

    ``safe_open`` maps the whole file; every page it touches stays resident and counts in the
    process's memory until the mapping closes, so walking two 2 GB inputs that way shows 4 GB on
    top of the output. Plain reads keep only the tensor being combined.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd = -1  # set first: __del__ runs even when the checks below refuse the file
        header = read_safetensors_header(path)
        unknown = {e.get("dtype") for k, e in header.items() if k != "__metadata__"} - set(_ST_DTYPES)
        if unknown:
            raise WeightsError(f"{path} holds tensors of dtype {sorted(map(str, unknown))}, which dreamtune cannot "
                               "read; is it an SD 1.x weight file?")
        self.metadata = header.pop("__metadata__", None) or {}
        self._header = header
        self._fd = os.open(path, os.O_RDONLY)
        self._base = 8 + int.from_bytes(os.pread(self._fd, 8, 0), "little")

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return sorted(self._header, key=lambda k: self._header[k]["data_offsets"][0])

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` from the header."""
        return tuple(self._header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        """dtype of ``key`` from the header."""
        return _ST_DTYPES[self._header[key]["dtype"]]

    def get_tensor(self, key: str) -> torch.Tensor:
        """Read one tensor's bytes into a fresh CPU tensor."""
        entry = self._header[key]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            chunk = os.preadv(self._fd, [view[done:]], self._base + begin + done)
            if chunk <= 0:
                raise WeightsError(f"{self.path} is truncated (tensor {key!r})")
            done += chunk
        dtype = _ST_DTYPES[entry["dtype"]]
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])

    def close(self) -> None:
        """Close the file descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


class DictReader:
    """The reader interface over an in-memory state dict (an allowed pickle)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = dict(tensors)

    def keys(self) -> list[str]:
        """Tensor names."""
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key``."""
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        """dtype of ``key``."""
        return self._tensors[key].dtype

    def get_tensor(self, key: str) -> torch.Tensor:
        """The tensor itself (callers copy before writing into it)."""
        return self._tensors[key]

    def close(self) -> None:
        """Drop the tensors."""
        self._tensors = {}


Reader = SafetensorsReader | DictReader


class TensorSource:
    """Named tensors read lazily: ``keys``, ``shape(k)``, ``dtype(k)``, ``get(k)``; a context manager."""

    def __init__(self, name: str, path: Path, entries: dict[str, tuple[Reader, str, bool]]):
        self.name = name
        self.path = path
        self._entries = entries  # canonical key -> (reader, stored key, reshape 2-D to 1x1 conv)

    @property
    def keys(self) -> list[str]:
        """Canonical keys in a stable order."""
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        """The canonical shape of ``key`` without reading its data."""
        reader, stored, to_conv = self._entries[key]
        shape = reader.shape(stored)
        return (*shape, 1, 1) if to_conv else shape

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of ``key``."""
        reader, stored, _ = self._entries[key]
        return reader.dtype(stored)

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (canonical shape)."""
        reader, stored, to_conv = self._entries[key]
        tensor = reader.get_tensor(stored)
        return tensor.reshape(*tensor.shape, 1, 1) if to_conv else tensor

    def close(self) -> None:
        """Close the readers."""
        for reader in {id(r): r for r, _, _ in self._entries.values()}.values():
            reader.close()
        self._entries = {}

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_reader(path: Path, allow_pickle: bool) -> tuple[Reader, list[str]]:
    """A reader (a dict one for allowed pickles) and its keys."""
    if is_pickle_path(path):
        tensors, _ = load_safetensors(path, allow_pickle=allow_pickle)
        reader: Reader = DictReader(tensors)
    elif not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    else:
        reader = SafetensorsReader(path)
    return reader, reader.keys()


def open_state_file(path: PathLike, allow_pickle: bool = False) -> TensorSource:
    """A weight file as is (keys unchanged), e.g. a run's ``trainable_unet.safetensors``."""
    p = Path(path)
    handle, keys = open_reader(p, allow_pickle)
    return TensorSource(p.name, p, {k: (handle, k, False) for k in keys})


def read_state(source: TensorSource, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a source (cast floating ones to ``dtype``), one read at a time."""
    return {key: cast_floating(source.get(key), dtype) for key in source.keys}


def cast_floating(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` in ``dtype`` if it is floating point and ``dtype`` is given; else unchanged."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def cast_state(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating tensors to ``dtype`` (None keeps them)."""
    return {k: cast_floating(v, dtype) for k, v in state.items()}
