"""Weight-file I/O: atomic safetensors writes with string metadata, guarded pickle reads.

Every weight file dreamtune writes is a ``.safetensors`` file written atomically (temp file in the
same folder, fsync, ``os.replace``), so a crash or a full disk never leaves a truncated file under
the final name. Pickled checkpoints (``.ckpt``/``.pt``/``.bin``/``.pth``) can run code when
loaded; they are refused unless the caller opts in with ``allow_pickle=True`` (CLI
``--allow-pickle``), and even then go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from safetensors.torch import save as _serialize

from ..errors import WeightsError

PathLike = str | os.PathLike

#: Suffixes that hold pickled data (refused unless ``allow_pickle=True``).
PICKLE_SUFFIXES = (".ckpt", ".pt", ".bin", ".pth")

#: The SAI model-spec version we write (``modelspec.sai_model_spec``).
MODELSPEC_VERSION = "1.0.0"


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, then rename it into place.

    The final name only ever holds a complete file: if ``write`` raises, the temp file is removed
    and whatever was at ``path`` before is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _default_file_mode())  # mkstemp makes 0600; give the usual umask mode
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)
    return final


def _default_file_mode() -> int:
    """The mode ``open()`` would give a new file (0666 minus the process umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_file(path: str) -> None:
    """Flush a written file's bytes to disk so the rename never exposes an empty file."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stringify_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Coerce metadata values to ``str`` (safetensors headers hold only strings); None is dropped."""
    out: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be str, got {key!r} ({type(key).__name__})")
        if value is None:
            continue
        out[key] = value if isinstance(value, str) else _to_str(value)
    return out


def _to_str(value: Any) -> str:
    """JSON for containers (what kohya does for ss_datasets etc.), ``str()`` for scalars."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach, move to CPU, make contiguous, and copy only views/shared storage (safetensors refuses them)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"tensor {key!r} is a {type(value).__name__}, not a torch.Tensor")
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
            storage = tensor.untyped_storage()
        if tensor.numel():
            seen.add(storage.data_ptr())
        out[key] = tensor
    return out


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: PathLike,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``tensors`` to ``path`` atomically with string ``metadata`` in the header."""
    prepared = _prepare_tensors(tensors)
    header = stringify_metadata(metadata)
    return atomic_write(path, lambda tmp: save_file(prepared, tmp, metadata=header or None))


#: The largest header safetensors itself accepts (100 MB); a larger length field means a damaged or foreign file.
MAX_HEADER_BYTES = 100_000_000


def _not_safetensors(path: Path, why: str) -> WeightsError:
    return WeightsError(f"{path} is not a readable .safetensors file ({why}); is it truncated, damaged or another "
                        "format? Re-download or re-export it")


def read_safetensors_header(path: PathLike) -> dict[str, Any]:
    """The parsed JSON header of a ``.safetensors`` file, checked against the file's size before anything is
    allocated: empty, truncated, text, oversized-header and out-of-range files are refused naming the file."""
    p = _require_file(path)
    size = p.stat().st_size
    with open(p, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise _not_safetensors(p, f"{size} bytes, shorter than the 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise _not_safetensors(p, f"its header length field says {length} bytes, the file has {size}")
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise _not_safetensors(p, f"the header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise _not_safetensors(p, "the header is not a JSON object")
    data_bytes = size - 8 - length
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes or not isinstance(entry.get("shape"), list)):
            raise _not_safetensors(p, f"tensor {key!r} lies outside the file's {data_bytes} data bytes")
    return header


def is_pickle_path(path: PathLike) -> bool:
    """True for the suffixes that hold pickled data (``.ckpt .pt .bin .pth``)."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def _require_file(path: PathLike) -> Path:
    """Return ``path`` as a Path, or raise FileNotFoundError naming it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weight file not found: {p}")
    return p


def load_pickle(path: PathLike, allow_pickle: bool = False) -> Any:
    """Load a pickled checkpoint with ``torch.load(weights_only=True)``, only when allowed."""
    p = _require_file(path)
    if not allow_pickle:
        raise WeightsError(
            f"{p} is a pickled checkpoint ({p.suffix}); loading pickles can run arbitrary code. "
            "Pass allow_pickle=True (CLI: --allow-pickle) if you trust this file, "
            "or convert it to .safetensors."
        )
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError/RuntimeError with long texts
        raise WeightsError(
            f"could not load {p} with torch.load(weights_only=True): it holds objects other than "
            f"tensors and plain containers ({err.__class__.__name__}: {str(err).splitlines()[0]})"
        ) from err


def _split_pickled_state(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Unwrap ``{"state_dict": ...}``; tensors are returned, top-level scalars become metadata."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    metadata: dict[str, str] = {}
    state = obj
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        state = obj["state_dict"]
        metadata = {
            k: str(v) for k, v in obj.items() if isinstance(v, (int, float, str, bool)) and k != "state_dict"
        }
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                "this is not a flat state dict (is it a textual-inversion .pt? use load_embedding)"
            )
        tensors[str(key)] = value
    return tensors, metadata


def load_safetensors(
    path: PathLike, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load ``(tensors, metadata)`` from a ``.safetensors`` file, or from a pickle when allowed."""
    p = _require_file(path)
    if is_pickle_path(p):
        return _split_pickled_state(load_pickle(p, allow_pickle=allow_pickle), p)
    read_safetensors_header(p)
    try:
        return load_file(p, device="cpu"), read_metadata(p)
    except SafetensorError as err:
        raise WeightsError(
            f"{p} is not a readable .safetensors file ({err}); is it truncated or another format?"
        ) from err


def read_metadata(path: PathLike) -> dict[str, str]:
    """Return the string metadata of a ``.safetensors`` header without loading any tensor."""
    p = _require_file(path)
    if is_pickle_path(p):
        raise WeightsError(f"{p} is a pickled checkpoint; only .safetensors files carry header metadata")
    read_safetensors_header(p)
    try:
        with safe_open(p, framework="pt", device="cpu") as fh:
            return dict(fh.metadata() or {})
    except SafetensorError as err:
        raise WeightsError(
            f"{p} is not a readable .safetensors file ({err}); is it truncated or another format?"
        ) from err


def content_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of the tensor bytes of a safetensors file (header excluded).

    This is what kohya stores as ``sshs_model_hash`` and, prefixed ``0x``, what the SAI model
    spec calls ``modelspec.hash_sha256``; it does not change when only metadata changes. The
    tensors are serialized in memory, which suits LoRA- and embedding-sized files.
    """
    blob = _serialize(_prepare_tensors(tensors))
    header_len = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header_len :]).hexdigest()


def modelspec_metadata(
    *,
    architecture: str,
    implementation: str,
    title: str,
    resolution: int | tuple[int, int] | None = None,
    trigger_phrase: str | None = None,
    prediction_type: str | None = None,
    description: str | None = None,
    author: str | None = None,
    license: str | None = None,
    date: _dt.datetime | str | None = None,
) -> dict[str, str]:
    """Build SAI model-spec keys (``modelspec.*``); UIs use them to identify and label a file."""
    values = {
        "sai_model_spec": MODELSPEC_VERSION,
        "architecture": architecture,
        "implementation": implementation,
        "title": title,
        "resolution": _resolution_str(resolution) if resolution is not None else None,
        "trigger_phrase": trigger_phrase,
        "prediction_type": prediction_type,
        "description": description,
        "author": author,
        "license": license,
        "date": _iso_date(date),
    }
    return {f"modelspec.{k}": v for k, v in values.items() if v is not None}


def _resolution_str(resolution: int | tuple[int, int]) -> str:
    """``512`` or ``(512, 512)`` -> ``"512x512"`` (width x height, as the spec asks)."""
    if isinstance(resolution, int):
        return f"{resolution}x{resolution}"
    width, height = resolution
    return f"{int(width)}x{int(height)}"


def _iso_date(date: _dt.datetime | str | None) -> str:
    """ISO-8601 UTC timestamp (now when ``date`` is None); strings pass through unchanged."""
    if isinstance(date, str):
        return date
    moment = date or _dt.datetime.now(_dt.timezone.utc)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.astimezone(_dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
