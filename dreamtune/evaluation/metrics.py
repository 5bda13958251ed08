"""The DreamBooth paper's metrics over image folders with transformers models: CLIP-T, CLIP-I and DINO.

Weights load from safetensors only (``use_safetensors=True``); no remote code is ever run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import DreamtuneError

# CLIP-T: cosine between each generated image's CLIP image embedding and its prompt's CLIP text embedding.
# CLIP-I / DINO: mean cosine over every (generated, reference) image pair, with CLIP image embeddings or
# the CLS token of a DINO ViT. The prompts for CLIP-T come from one of:
# - a ``.jsonl`` file: one ``{"file_name": "a.png", "prompt": "..."}`` row per generated image
#   (``"text"`` is accepted for ``"prompt"``; ``file_name`` is relative to the images folder);
# - any other text file: one prompt per non-blank line, one line per generated image, in the images'
#   sorted path order (plain string order: zero-pad numbers, ``img_002.png`` before ``img_010.png``);
# - no file: a ``.txt`` (or ``.caption``) sidecar beside each image, as in dreamtune's data folders.

#: Metric names, in the order they are reported.
METRICS = ("clip_t", "clip_i", "dino")
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
#: Hub revisions that hold safetensors weights for default ids whose main branch has only pickle
#: files (the safetensors conversion bot's pull requests); an explicit revision overrides these.
SAFETENSORS_REVISIONS = {DEFAULT_CLIP_MODEL: "refs/pr/32", DEFAULT_DINO_MODEL: "refs/pr/1"}
PROMPT_EXTENSIONS = (".txt", ".caption")
_PAIR_METRICS = ("clip_i", "dino")


class EvaluationError(DreamtuneError, ValueError):
    """A user error: missing or empty folder, prompts that do not match the images, unknown metric, bad model."""


def parse_metrics(metrics: str | Iterable[str]) -> list[str]:
    """Metric names from ``"clip_t,dino"`` or a list: stripped, lower-cased, deduplicated, all known."""
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names = list(dict.fromkeys(name.strip().lower() for name in names if name.strip()))
    if not names:
        raise EvaluationError(f"no metric given; choose from {', '.join(METRICS)}")
    for name in names:
        if name not in METRICS:
            raise EvaluationError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    return names


def list_images(folder: str | Path, role: str = "images") -> list[Path]:
    """Image files under ``folder`` (recursive, sorted by path); EvaluationError names a missing or empty folder."""
    from ..data.autocaption import find_images
    from ..data.images import IMAGE_EXTENSIONS

    folder = Path(folder)
    if not folder.exists():
        raise EvaluationError(f"{role} folder {folder} does not exist")
    if not folder.is_dir():
        raise EvaluationError(f"{role} folder {folder} is not a folder")
    images = find_images(folder)
    if not images:
        raise EvaluationError(f"{role} folder {folder} holds no images ({' '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


def _read_text(path: Path) -> str:
    """A prompt file's text, or EvaluationError naming a file that is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EvaluationError(f"prompt file {path} is not UTF-8 text ({err.reason})") from err


def _sidecar_prompts(images: Sequence[Path]) -> list[str]:
    """The first non-empty .txt/.caption beside each image; EvaluationError lists images without one."""
    prompts, missing = [], []
    for image in images:
        sidecars = [image.with_suffix(ext) for ext in PROMPT_EXTENSIONS if image.with_suffix(ext).is_file()]
        found = next((text for text in (_read_text(path).strip() for path in sidecars) if text), None)
        if found:
            prompts.append(found)
        else:
            missing.append(image)
    if missing:
        raise EvaluationError(
            f"no prompt for {len(missing)} of {len(images)} images (first: {missing[0]}): pass a prompts file "
            f"(one line per image, sorted file-name order) or write {missing[0].with_suffix('.txt').name} beside it")
    return prompts


def _jsonl_prompts(path: Path, images: Sequence[Path], root: Path) -> list[str]:
    """Prompts from ``{"file_name", "prompt"|"text"}`` rows, one per image, matched by path under ``root``."""
    rows: dict[str, str] = {}
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvaluationError(f"{path}:{number}: not JSON ({err.msg})") from err
        prompt = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(row, dict) or "file_name" not in row or not isinstance(prompt, str):
            raise EvaluationError(f"{path}:{number}: each row needs 'file_name' and 'prompt' (or 'text')")
        rows[Path(row["file_name"]).as_posix()] = prompt.strip()
    keys = [image.relative_to(root).as_posix() for image in images]
    missing, extra = [k for k in keys if k not in rows], sorted(set(rows) - set(keys))
    if missing or extra:
        raise EvaluationError(
            f"prompts file {path} has {len(rows)} rows for {len(images)} images in {root}"
            + (f"; no row for {len(missing)} (first: {missing[0]})" if missing else "")
            + (f"; {len(extra)} rows name no image (first: {extra[0]})" if extra else ""))
    return [rows[k] for k in keys]


def load_prompts(images: Sequence[Path], root: str | Path, prompts: str | Path | None = None) -> list[str]:
    """One prompt per image, by the module's rule: a .jsonl file, a one-line-per-image text file, or sidecars."""
    if prompts is None:
        return _sidecar_prompts(images)
    path = Path(prompts)
    if not path.is_file():
        raise EvaluationError(f"prompts file {path} does not exist")
    if path.suffix.lower() == ".jsonl":
        return _jsonl_prompts(path, images, Path(root))
    lines = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if len(lines) != len(images):
        raise EvaluationError(
            f"prompts file {path} has {len(lines)} prompts for {len(images)} images in {root}; "
            "write one prompt per line, one line per image in sorted file-name order")
    return lines


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load(what: str, model: str, revision: str | None, loader):
    """Run ``loader(model, revision)``, turning the libraries' load errors into one EvaluationError."""
    revision = revision or (None if Path(model).exists() else SAFETENSORS_REVISIONS.get(model))
    try:
        return loader(model, revision)
    except (OSError, ValueError) as err:
        at = f"revision {revision}, " if revision else ""
        raise EvaluationError(f"cannot load {what} model {model!r} ({at}safetensors weights only): {err}") from err


def load_clip(model: str = DEFAULT_CLIP_MODEL, device: str | None = None, revision: str | None = None):
    """(CLIPModel, CLIPProcessor) from a hub id or folder, safetensors only, in eval mode on ``device``."""
    from transformers import CLIPModel, CLIPProcessor

    def loader(name: str, rev: str | None):
        processor = CLIPProcessor.from_pretrained(name, revision=rev)
        network = CLIPModel.from_pretrained(name, revision=rev, use_safetensors=True)
        return network.to(_device(device)).eval(), processor

    return _load("CLIP", model, revision, loader)


def load_dino(model: str = DEFAULT_DINO_MODEL, device: str | None = None, revision: str | None = None):
    """(ViT model, image processor) via AutoModel from a hub id or folder, safetensors only, in eval mode."""
    from transformers import AutoImageProcessor, AutoModel

    def loader(name: str, rev: str | None):
        processor = AutoImageProcessor.from_pretrained(name, revision=rev)
        network = AutoModel.from_pretrained(name, revision=rev, use_safetensors=True)
        return network.to(_device(device)).eval(), processor

    return _load("DINO", model, revision, loader)


def _batches(images: Sequence, batch_size: int):
    """PIL images in chunks of ``batch_size``; paths are opened as RGB only when their chunk comes."""
    from ..data.images import open_rgb

    for start in range(0, len(images), batch_size):
        yield [open_rgb(item) if isinstance(item, (str, Path)) else item for item in images[start:start + batch_size]]


def _pooled(output):
    """Projected features from ``get_*_features``: a tensor (transformers 4) or an output's pooler_output (5)."""
    return output if hasattr(output, "shape") else output.pooler_output


def clip_image_embeddings(images: Sequence, model, processor, batch_size: int = 32):
    """L2-normalised CLIP image embeddings [N, D] of image paths or PIL images."""
    import torch

    device, chunks = next(model.parameters()).device, []
    with torch.no_grad():
        for batch in _batches(images, batch_size):
            pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
            chunks.append(_pooled(model.get_image_features(pixel_values=pixels)).float())
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


def clip_text_embeddings(prompts: Sequence[str], model, processor, batch_size: int = 32):
    """L2-normalised CLIP text embeddings [N, D]; prompts past the tokenizer's length are truncated."""
    import torch

    device, chunks = next(model.parameters()).device, []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            tokens = processor.tokenizer(list(prompts[start:start + batch_size]), padding=True, truncation=True,
                                         return_tensors="pt").to(device)
            chunks.append(_pooled(model.get_text_features(input_ids=tokens["input_ids"],
                                                          attention_mask=tokens["attention_mask"])).float())
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


def dino_embeddings(images: Sequence, model, processor, batch_size: int = 32):
    """L2-normalised CLS-token embeddings [N, D] of a DINO ViT (last hidden state, position 0)."""
    import torch

    device, chunks = next(model.parameters()).device, []
    with torch.no_grad():
        for batch in _batches(images, batch_size):
            pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
            chunks.append(model(pixel_values=pixels).last_hidden_state[:, 0].float())
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


def evaluate(
    images: str | Path,
    reference: str | Path | None = None,
    prompts: str | Path | None = None,
    metrics: str | Iterable[str] = METRICS,
    clip_model: str = DEFAULT_CLIP_MODEL,
    dino_model: str = DEFAULT_DINO_MODEL,
    device: str | None = None,
    batch_size: int = 32,
    clip_revision: str | None = None,
    dino_revision: str | None = None,
) -> dict:
    """Score generated ``images``: {"metrics": {name: mean}, "per_image": {name: {file: value}}, counts, models}.

    Metric names, folders and prompts are all checked before any model loads."""
    names = parse_metrics(metrics)
    if batch_size < 1:
        raise EvaluationError(f"batch size must be at least 1, got {batch_size}")
    root = Path(images)
    generated = list_images(root, "images")
    pair_metrics = [name for name in names if name in _PAIR_METRICS]
    references: list[Path] = []
    if pair_metrics:
        if reference is None:
            raise EvaluationError(f"{' and '.join(pair_metrics)} need a reference folder of real images")
        references = list_images(reference, "reference")
    texts = load_prompts(generated, root, prompts) if "clip_t" in names else []
    keys = [path.relative_to(root).as_posix() for path in generated]
    scores: dict[str, object] = {}
    models: dict[str, str] = {}
    if "clip_t" in names or "clip_i" in names:
        network, processor = load_clip(clip_model, device, clip_revision)
        models["clip"] = clip_model
        embedded = clip_image_embeddings(generated, network, processor, batch_size)
        if "clip_t" in names:
            scores["clip_t"] = (embedded * clip_text_embeddings(texts, network, processor, batch_size)).sum(-1)
        if "clip_i" in names:
            scores["clip_i"] = (embedded @ clip_image_embeddings(references, network, processor, batch_size).T).mean(1)
        del network
    if "dino" in names:
        network, processor = load_dino(dino_model, device, dino_revision)
        models["dino"] = dino_model
        embedded = dino_embeddings(generated, network, processor, batch_size)
        scores["dino"] = (embedded @ dino_embeddings(references, network, processor, batch_size).T).mean(1)
        del network
    return {
        "metrics": {name: float(scores[name].mean()) for name in names},
        "per_image": {name: dict(zip(keys, scores[name].tolist())) for name in names},
        "images": len(generated),
        "reference": len(references),
        "prompts": dict(zip(keys, texts)) if texts else {},
        "models": models,
    }
