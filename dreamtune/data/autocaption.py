"""Write `.txt` caption sidecars for a folder of images with a BLIP captioning model (transformers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .images import IMAGE_EXTENSIONS, BadImageError, open_rgb

DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-base"


@dataclass
class CaptionRun:
    """What a captioning pass wrote, left alone, and could not read."""

    written: list[Path] = field(default_factory=list)
    existing: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"caption: {len(self.written)} written, {len(self.existing)} kept (exist; --overwrite replaces), "
                 f"{len(self.failed)} failed"]
        lines += [f"  failed {path}: {why}" for path, why in self.failed[:20]]
        return "\n".join(lines)


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, skipping hidden folders."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def load_captioner(model: str, device: str | None = None) -> tuple[object, object, str]:
    """(processor, model, device) for a BLIP captioning model id or folder."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor = BlipProcessor.from_pretrained(model)
    network = BlipForConditionalGeneration.from_pretrained(model).to(device).eval()
    return processor, network, device


def caption_images(images: list, processor, network, device: str, max_new_tokens: int = 40) -> list[str]:
    """One caption per PIL image."""
    import torch

    inputs = processor(images=images, return_tensors="pt").to(device)
    with torch.no_grad():
        ids = network.generate(**inputs, max_new_tokens=max_new_tokens)
    return [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]


def caption_folder(
    folder: str | Path,
    model: str = DEFAULT_CAPTION_MODEL,
    prefix: str = "",
    overwrite: bool = False,
    batch_size: int = 8,
    extension: str = ".txt",
    max_new_tokens: int = 40,
    progress: Callable[[int], None] | None = None,
) -> CaptionRun:
    """Caption every image in ``folder`` without a sidecar (or all with ``overwrite``); ``progress(n)`` per batch."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass a folder of images")
    run = CaptionRun()
    todo = []
    for path in find_images(folder):
        (todo.append(path) if overwrite or not path.with_suffix(extension).exists() else run.existing.append(path))
    if not todo:
        return run
    processor, network, device = load_captioner(model)
    for start in range(0, len(todo), batch_size):
        batch, images = [], []
        for path in todo[start : start + batch_size]:
            try:
                images.append(open_rgb(path))
                batch.append(path)
            except BadImageError as err:
                run.failed.append((path, str(err)))
        texts = caption_images(images, processor, network, device, max_new_tokens) if images else []
        for path, text in zip(batch, texts):
            caption = ", ".join(part for part in (prefix.strip(), text) if part)
            path.with_suffix(extension).write_text(caption + "\n", encoding="utf-8")
            run.written.append(path)
        if progress is not None:
            progress(len(todo[start : start + batch_size]))
    return run
