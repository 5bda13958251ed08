"""Read any SD 1.x checkpoint tensor by tensor in single-file naming; write checkpoints in either layout.

A :class:`TensorSource` is a lazily read set of named tensors: a single-file ``.safetensors``
checkpoint, a diffusers folder (its ``unet/``, ``vae/`` and ``text_encoder/`` weights renamed
through the key maps of its own configs) or a plain state-dict file. Tensors are read one at a
time (header parsed once, data read with ``pread``, not mmap), so tools that walk a checkpoint key
by key (blend, merge, convert) never hold a whole input model in memory. Keys are canonical single-file names: text-encoder keys
always under ``cond_stage_model.transformer.text_model.``, VAE attention as 1x1 convs.

Writers: :func:`save_checkpoint` writes a single file or, through :func:`pipeline_from_state`,
a diffusers folder (built in a temp folder beside the target and renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .ldm_keys import TEXT_MODEL_PREFIX, TEXT_PREFIX, TEXT_ROOTS, UNET_PREFIX, VAE_PREFIX, unet_key_map, vae_key_map
from .safetensors_io import PathLike, is_pickle_path, load_safetensors, modelspec_metadata, save_safetensors
from .single_file import (
    ARCHITECTURE,
    IMPLEMENTATION,
    SD1_CONFIG_DIR,
    HARMLESS_KEYS,
    HARMLESS_PREFIXES,
    _load_scheduler,
    _materialize,
    _read_json,
    load_clip_tokenizer,
    refuse_non_sd1,
    single_file_to_diffusers,
)

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

#: Weight file names looked for in each diffusers component folder, safetensors first.
_COMPONENT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"),
}
_VAE_ATTN_1X1 = re.compile(r"^first_stage_model\.(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


class WeightsError(ValueError):
    """An input that the weight tools cannot use as given (wrong kind, mismatched keys or shapes)."""


# ----------------------------------------------------------------------------- sources


class SafetensorsReader:
    """Reads a ``.safetensors`` file tensor by tensor with ``pread`` (header parsed once, no mmap).

    ``safe_open`` maps the whole file; every page it touches stays resident and counts in the
    process's memory until the mapping closes, so walking two 2 GB inputs that way shows 4 GB on
    top of the output. Plain reads keep only the tensor being combined.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            size = int.from_bytes(os.pread(self._fd, 8, 0), "little")
            header = json.loads(os.pread(self._fd, size, 8))
        except (ValueError, OSError) as err:
            os.close(self._fd)
            raise WeightsError(f"{path} is not a readable .safetensors file ({err})") from err
        self.metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + size
        self._header = header

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


_ST_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def _open_file(path: Path, allow_pickle: bool) -> tuple[Reader, list[str]]:
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
    handle, keys = _open_file(p, allow_pickle)
    return TensorSource(p.name, p, {k: (handle, k, False) for k in keys})


def _canonical_single_key(key: str) -> str | None:
    """Canonical name of a single-file key; None for known harmless extras."""
    if key in HARMLESS_KEYS or key.startswith(HARMLESS_PREFIXES):
        return None
    if key.startswith(TEXT_PREFIX) and not key.startswith(TEXT_MODEL_PREFIX):
        rest = key[len(TEXT_PREFIX):]
        return TEXT_MODEL_PREFIX + rest if rest.startswith(TEXT_ROOTS) else key
    return key


def open_single_file(path: PathLike, allow_pickle: bool = False) -> TensorSource:
    """A single-file SD 1.x checkpoint, keys canonical (old text-encoder naming and 2-D VAE attention fixed)."""
    p = Path(path)
    handle, keys = _open_file(p, allow_pickle)
    refuse_non_sd1(keys)
    entries: dict[str, tuple[Reader, str, bool]] = {}
    for key in keys:
        name = _canonical_single_key(key)
        if name is None:
            continue
        entries[name] = (handle, key, bool(_VAE_ATTN_1X1.match(name)) and len(handle.shape(key)) == 2)
    if not any(k.startswith(UNET_PREFIX) for k in entries):
        raise WeightsError(f"{p} is not an SD 1.x checkpoint: it has no '{UNET_PREFIX}*' keys")
    return TensorSource(p.name, p, entries)


def component_file(folder: Path, component: str, allow_pickle: bool) -> Path:
    """The weight file of one component of a diffusers folder (pickles only when allowed)."""
    for name in _COMPONENT_FILES[component]:
        candidate = folder / component / name
        if candidate.is_file():
            if is_pickle_path(candidate) and not allow_pickle:
                raise WeightsError(f"{candidate} is a pickle; pass --allow-pickle if you trust it")
            return candidate
    raise WeightsError(f"{folder} is not a diffusers SD 1.x folder: no weights in {folder / component}/")


def open_diffusers_folder(folder: PathLike, allow_pickle: bool = False) -> TensorSource:
    """A diffusers SD 1.x folder, its UNet/VAE/text-encoder keys renamed to canonical single-file names."""
    root = Path(folder)
    entries: dict[str, tuple[Reader, str, bool]] = {}
    unet_map = unet_key_map(_read_json(root / "unet" / "config.json"))
    vae_map = vae_key_map(_read_json(root / "vae" / "config.json"))
    for component, key_map in (("unet", unet_map), ("vae", vae_map)):
        handle, keys = _open_file(component_file(root, component, allow_pickle), allow_pickle)
        for key in keys:
            if key not in key_map.to_single:
                raise WeightsError(f"{root}/{component}: key {key!r} is not in the key map of its config")
            entries[key_map.to_single[key]] = (handle, key, key in key_map.conv1x1)
    handle, keys = _open_file(component_file(root, "text_encoder", allow_pickle), allow_pickle)
    for key in keys:
        rest = key.removeprefix("text_model.")
        if rest.startswith(TEXT_ROOTS):
            entries[TEXT_MODEL_PREFIX + rest] = (handle, key, False)
    return TensorSource(root.name, root, entries)


def is_diffusers_folder(path: PathLike) -> bool:
    """A folder with ``unet/config.json`` (and so presumably a diffusers pipeline)."""
    return (Path(path) / "unet" / "config.json").is_file()


def open_checkpoint(path: PathLike, allow_pickle: bool = False) -> TensorSource:
    """Open a single-file checkpoint or a diffusers folder, keys canonical."""
    p = Path(path)
    if p.is_dir():
        if not is_diffusers_folder(p):
            raise WeightsError(f"{p} is a folder but not a diffusers SD 1.x pipeline (no unet/config.json)")
        return open_diffusers_folder(p, allow_pickle)
    if is_pickle_path(p) and not allow_pickle:
        raise WeightsError(f"{p} is a pickled checkpoint ({p.suffix}); pass --allow-pickle if you trust it")
    return open_single_file(p, allow_pickle)


def component_of(key: str) -> str:
    """``unet``, ``vae``, ``text_encoder`` or ``other`` for a canonical key."""
    if key.startswith(UNET_PREFIX):
        return "unet"
    if key.startswith(VAE_PREFIX):
        return "vae"
    if key.startswith(TEXT_PREFIX):
        return "text_encoder"
    return "other"


# ----------------------------------------------------------------------------- provenance


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


def checkpoint_metadata(title: str, extra: Mapping[str, str]) -> dict[str, str]:
    """Model-spec keys for an SD 1.x checkpoint plus ``extra``."""
    spec = modelspec_metadata(architecture=ARCHITECTURE, implementation=IMPLEMENTATION, title=title)
    return spec | {"format": "pt"} | dict(extra)


# ----------------------------------------------------------------------------- writers


def cast_state(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating tensors to ``dtype`` (None keeps them)."""
    if dtype is None:
        return dict(state)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def config_dir_for(paths: Iterable[PathLike], config_dir: PathLike | None = None) -> Path:
    """The configs to use: ``config_dir``, else the first diffusers-folder input, else the shipped SD 1.5 set."""
    if config_dir is not None:
        return Path(config_dir)
    for p in paths:
        if Path(p).is_dir() and is_diffusers_folder(p):
            return Path(p)
    return SD1_CONFIG_DIR


def pipeline_from_state(state: Mapping[str, torch.Tensor], config_dir: PathLike,
                        torch_dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` from a canonical single-file state dict and a config folder."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(config_dir)
    unet_config = _read_json(folder / "unet" / "config.json")
    vae_config = _read_json(folder / "vae" / "config.json")
    text_config = CLIPTextConfig.from_dict(_read_json(folder / "text_encoder" / "config.json"))
    unet_sd, vae_sd, text_sd = single_file_to_diffusers(state, unet_config, vae_config)
    dtype = torch_dtype or torch.float32
    return StableDiffusionPipeline(
        vae=_materialize(lambda: AutoencoderKL.from_config(vae_config), vae_sd, dtype, "VAE"),
        text_encoder=_materialize(lambda: CLIPTextModel(text_config), text_sd, dtype, "text encoder"),
        tokenizer=load_clip_tokenizer(folder / "tokenizer"),
        unet=_materialize(lambda: UNet2DConditionModel.from_config(unet_config), unet_sd, dtype, "UNet"),
        scheduler=_load_scheduler(_read_json(folder / "scheduler" / "scheduler_config.json")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def atomic_folder(target: PathLike, write) -> Path:
    """Call ``write(tmp_folder)`` on a temp folder beside ``target``, then rename it into place."""
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_diffusers_folder(state: Mapping[str, torch.Tensor], target: PathLike, config_dir: PathLike,
                          metadata: Mapping[str, str], dtype: torch.dtype | None = None) -> Path:
    """Write a canonical state dict as a diffusers folder (atomic); metadata goes to ``dreamtune_provenance.json``."""
    pipe = pipeline_from_state(state, config_dir, dtype)

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "dreamtune_provenance.json").write_text(json.dumps(dict(metadata), indent=2) + "\n")

    return atomic_folder(target, write)


def save_checkpoint(state: Mapping[str, torch.Tensor], target: PathLike, fmt: str,
                    metadata: Mapping[str, str], config_dir: PathLike | None = None) -> Path:
    """Write a canonical state dict as ``single-file`` (``.safetensors``) or ``diffusers`` (folder)."""
    if fmt == "diffusers":
        return save_diffusers_folder(state, target, config_dir or SD1_CONFIG_DIR, metadata)
    if fmt != "single-file":
        raise WeightsError(f"unknown output format {fmt!r}; use single-file or diffusers")
    if Path(target).suffix != ".safetensors":
        raise WeightsError(f"single-file output {target} must end in .safetensors")
    return save_safetensors(state, target, checkpoint_metadata(Path(target).stem, metadata))


def read_state(source: TensorSource, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a source (cast floating ones to ``dtype``), one read at a time."""
    out = {}
    for key in source.keys:
        tensor = source.get(key)
        out[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out


# ----------------------------------------------------------------------------- file conversions


def convert_checkpoint(src: PathLike, dst: PathLike, fmt: str, dtype: torch.dtype | None,
                       metadata: Mapping[str, str], config_dir: PathLike | None = None,
                       allow_pickle: bool = False) -> Path:
    """Single-file <-> diffusers folder (or a dtype change), tensor for tensor."""
    with open_checkpoint(src, allow_pickle) as source:
        state = read_state(source, dtype)
    return save_checkpoint(state, dst, fmt, metadata, config_dir_for([src], config_dir))


def _lora_output(dst: Path) -> tuple[Path, str]:
    """``(folder, weight_name)`` for a diffusers LoRA target given as a file or a folder."""
    from .lora_formats import DIFFUSERS_LORA_WEIGHT_NAME

    if dst.suffix == ".safetensors":
        return dst.parent, dst.name
    return dst, DIFFUSERS_LORA_WEIGHT_NAME


def _most_common(values: Iterable[float]) -> float:
    """The most frequent value."""
    from collections import Counter

    return Counter(values).most_common(1)[0][0]


def convert_lora(src: PathLike, dst: PathLike, to: str, dtype: torch.dtype | None,
                 metadata: Mapping[str, str], allow_pickle: bool = False) -> Path:
    """kohya <-> diffusers/PEFT LoRA (``to``: ``kohya`` or ``diffusers``), alpha/rank preserved."""
    from .lora_formats import KohyaLora, kohya_metadata, peft_to_kohya, save_diffusers_lora
    from .merge import read_lora

    lora = read_lora(src, allow_pickle)
    unet, text = cast_state(lora.unet, dtype), cast_state(lora.text_encoder, dtype)
    if to == "kohya":
        tensors = peft_to_kohya(unet or None, text or None, rank=lora.ranks, alpha=lora.alphas)
        header = kohya_metadata(rank=int(_most_common(lora.ranks.values())),
                                alpha=float(_most_common(lora.alphas.values())),
                                title=Path(dst).stem, tensors=tensors, extra=metadata)
        return save_safetensors(tensors, dst, header)
    if to != "diffusers":
        raise WeightsError(f"a LoRA converts to kohya or diffusers, not {to!r}")
    shaped = KohyaLora(unet=unet, text_encoder=text, alphas=lora.alphas, ranks=lora.ranks)
    configs = {part: shaped.lora_config_kwargs(part) for part, state in (("unet", unet), ("text_encoder", text))
               if state}
    folder, name = _lora_output(Path(dst))
    return save_diffusers_lora(folder, unet or None, text or None, configs.get("unet"), configs.get("text_encoder"),
                               metadata, weight_name=name)


def convert_embedding(src: PathLike, dst: PathLike, to: str, dtype: torch.dtype | None,
                      metadata: Mapping[str, str], token: str | None = None, allow_pickle: bool = False) -> Path:
    """diffusers ``{token: vectors}`` <-> A1111 ``{emb_params: vectors}`` (``to``: ``diffusers``/``a1111``)."""
    from .embeddings import load_embedding, save_a1111_embedding, save_diffusers_embedding

    vectors, found = load_embedding(src, allow_pickle=allow_pickle, dtype=dtype)  # type: ignore[arg-type]
    if to == "a1111":
        return save_a1111_embedding(dst, vectors, name=found or Path(dst).stem, metadata=metadata,
                                    dtype=vectors.dtype)
    if to != "diffusers":
        raise WeightsError(f"an embedding converts to a1111 or diffusers, not {to!r}")
    name = token or found or Path(src).stem
    return save_diffusers_embedding(dst, name, vectors, dtype=vectors.dtype, metadata=metadata)

