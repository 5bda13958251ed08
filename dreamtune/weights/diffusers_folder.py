"""What a diffusers SD 1.x folder holds: component configs, the CLIP tokenizer and each component's weight file.

The SD 1.5 configs and tokenizer merges ship in ``sd1_configs/`` (a diffusers folder without weights),
so single-file checkpoints load and convert offline; any diffusers folder can stand in for them.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import WeightsError
from .safetensors_io import PathLike, is_pickle_path

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

#: The SD 1.5 configs and CLIP tokenizer merges that ship with dreamtune (no hub access needed).
SD1_CONFIG_DIR = Path(__file__).resolve().parent / "sd1_configs"

#: Weight file names looked for in each diffusers component folder, safetensors first.
COMPONENT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"),
}

#: The text-encoder key prefix of SD 1.5 on the hub. transformers 5 saves CLIPTextModel without it; ComfyUI's
#: diffusers loader and transformers < 5 (inside InvokeAI) then find no key and keep a random text encoder.
HUB_TEXT_ENCODER_PREFIX = "text_model."

_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_CLIP_MERGES = 49408 - 256 * 2 - len(_SPECIAL_TOKENS)


def read_json(path: Path) -> dict[str, Any]:
    """Read a config JSON, naming the file and what to do when it is missing."""
    if not path.is_file():
        raise FileNotFoundError(
            f"config file {path} not found: config_dir must be a diffusers-style folder with "
            "unet/config.json, vae/config.json, text_encoder/config.json, "
            "scheduler/scheduler_config.json and tokenizer/"
        )
    return json.loads(path.read_text())


def read_config(folder: PathLike, component: str) -> dict[str, Any]:
    """``<folder>/<component>/config.json`` (``scheduler_config.json`` for the scheduler)."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return read_json(Path(folder) / component / name)


def is_diffusers_folder(path: PathLike) -> bool:
    """A folder with ``unet/config.json`` (and so presumably a diffusers pipeline)."""
    return (Path(path) / "unet" / "config.json").is_file()


def require_diffusers_folder(path: Path) -> Path:
    """``path`` if it is a diffusers folder; a folder without ``unet/config.json`` is refused by name."""
    if not is_diffusers_folder(path):
        raise WeightsError(f"{path} is a folder but not a diffusers SD 1.x pipeline (no unet/config.json)")
    return path


def config_dir_for(paths: Iterable[PathLike], config_dir: PathLike | None = None) -> Path:
    """The configs to use: ``config_dir``, else the first diffusers-folder input, else the shipped SD 1.5 set."""
    if config_dir is not None:
        return Path(config_dir)
    for p in paths:
        if Path(p).is_dir() and is_diffusers_folder(p):
            return Path(p)
    return SD1_CONFIG_DIR


def find_component_file(folder: Path, component: str) -> Path | None:
    """The first weight file of ``component`` present in a diffusers folder, or None."""
    return next((folder / component / n for n in COMPONENT_FILES[component] if (folder / component / n).is_file()),
                None)


def component_file(folder: Path, component: str, allow_pickle: bool) -> Path:
    """The weight file of one component of a diffusers folder (pickles only when allowed)."""
    found = find_component_file(folder, component)
    if found is None:
        raise WeightsError(f"{folder} is not a diffusers SD 1.x folder: no weights in {folder / component}/")
    if is_pickle_path(found) and not allow_pickle:
        raise WeightsError(f"{found} is a pickle; pass --allow-pickle if you trust it")
    return found


def save_pipeline_folder(pipe: Any, folder: PathLike) -> Path:
    """``pipe.save_pretrained`` (safetensors) with the text encoder in the hub's SD 1.5 key layout, which every reader loads."""
    pipe.save_pretrained(folder, safe_serialization=True)
    write_hub_text_encoder_layout(Path(folder) / "text_encoder")
    return Path(folder)


def write_hub_text_encoder_layout(folder: Path) -> None:
    """Rename a saved CLIPTextModel's keys to ``text_model.<key>`` in place (shards and their index too)."""
    from safetensors import safe_open

    from .safetensors_io import save_safetensors

    def hub(key: str) -> str:
        return key if key.startswith(HUB_TEXT_ENCODER_PREFIX) else HUB_TEXT_ENCODER_PREFIX + key

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {hub(key): handle.get_tensor(key) for key in handle.keys()}
        save_safetensors(tensors, path, metadata=metadata)
    for index in folder.glob("*.safetensors.index.json"):
        data = json.loads(index.read_text())
        data["weight_map"] = {hub(k): v for k, v in data.get("weight_map", {}).items()}
        index.write_text(json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------- CLIP tokenizer


def _clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Derive CLIP's vocabulary from its merges: bytes, bytes+</w>, one per merge, specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())  # CLIP's 256 byte symbols, in vocabulary order
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    return {token: i for i, token in enumerate(tokens + list(_SPECIAL_TOKENS))}


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """Read CLIP's gzipped merges file (a version line, then one "a b" pair per line)."""
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
    merges = [(first, second) for first, second in (line.split(" ") for line in lines[1:] if line)]
    if len(merges) != _CLIP_MERGES:
        raise WeightsError(f"{path} has {len(merges)} merges; CLIP's tokenizer uses {_CLIP_MERGES}")
    return merges


def load_clip_tokenizer(tokenizer_dir: PathLike) -> CLIPTokenizer:
    """Load a CLIPTokenizer from a diffusers tokenizer/ folder or from our shipped merges."""
    from transformers import CLIPTokenizer

    folder = Path(tokenizer_dir)
    if any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        return CLIPTokenizer.from_pretrained(str(folder))
    merges_file = folder / "merges.txt.gz"
    if not merges_file.is_file():
        raise FileNotFoundError(
            f"no tokenizer in {folder}: expected tokenizer.json, vocab.json + merges.txt, or "
            "merges.txt.gz; pass config_dir pointing at a diffusers SD 1.x folder"
        )
    settings = read_json(folder / "tokenizer_config.json")
    merges = _read_merges(merges_file)
    return CLIPTokenizer(
        vocab=_clip_vocab(merges),
        merges=merges,
        **{k: settings[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")},
        model_max_length=settings["model_max_length"],
    )


def sd1_tokenizer() -> CLIPTokenizer:
    """The Stable Diffusion 1.x CLIP tokenizer (OpenAI CLIP BPE, 49408 tokens), built offline."""
    return load_clip_tokenizer(SD1_CONFIG_DIR / "tokenizer")
