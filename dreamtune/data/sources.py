"""Sources of (image, caption) records: an image folder with sidecar captions, or a `datasets` dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from .config import DataConfig
from .images import IMAGE_EXTENSIONS, BadImageError, open_rgb


class DataSourceError(ValueError):
    """A source that cannot give any usable image; the message names the path or column and the fix."""


@dataclass
class Record:
    """One training example before transforms: how to get its image, and its caption."""

    load: Callable[[], Image.Image]
    caption: str
    origin: str


@dataclass
class SourceReport:
    """What a scan used and what it skipped, with the reason per file."""

    used: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"data: {self.used} images used, {len(self.skipped)} skipped"]
        lines += [f"  skipped {origin}: {why}" for origin, why in self.skipped[:20]]
        if len(self.skipped) > 20:
            lines.append(f"  ... and {len(self.skipped) - 20} more")
        return "\n".join(lines)


def _read_caption(image_path: Path, extensions: list[str]) -> tuple[str | None, str | None]:
    """Return (caption, problem) from the first sidecar file found next to ``image_path``."""
    for ext in extensions:
        sidecar = image_path.with_suffix(ext)
        if sidecar.is_file():
            try:
                text = sidecar.read_text(encoding="utf-8").strip()
            except (UnicodeDecodeError, OSError) as err:
                return None, f"caption file {sidecar.name} is unreadable ({err}); save it as UTF-8"
            return (text or None), None
    return None, None


def _check_image(path: Path) -> str | None:
    """Return why ``path`` cannot be used as an image, or None when it can."""
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # PIL raises many kinds for broken files
        return f"not a readable image ({type(err).__name__}: {err})"
    return None


def folder_records(cfg: DataConfig) -> tuple[list[Record], SourceReport]:
    """Scan ``cfg.instance_dir`` recursively; broken files are skipped and reported, not fatal."""
    root = Path(cfg.instance_dir or "")
    if not root.is_dir():
        raise DataSourceError(f"data.instance_dir: {root} is not a folder; point it at a folder of images")
    extensions = list(dict.fromkeys([cfg.caption_extension, ".txt", ".caption"]))
    report, records = SourceReport(), []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        problem = _check_image(path)
        caption, caption_problem = _read_caption(path, extensions)
        problem = problem or caption_problem
        if problem is None and caption is None and not cfg.instance_prompt:
            problem = "no caption file and no data.instance_prompt to fall back on"
        if problem:
            report.skipped.append((str(path), problem))
            continue
        records.append(Record(load=lambda p=path: open_rgb(p), caption=caption or cfg.instance_prompt, origin=str(path)))
    report.used = len(records)
    if not records:
        raise DataSourceError(
            f"data.instance_dir: no usable images in {root} "
            f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}).\n{report.summary()}"
        )
    return records, report


def _load_dataset(cfg: DataConfig) -> Any:
    """Open ``cfg.dataset`` as a hub id, a `save_to_disk` folder, an image folder or a data file."""
    import datasets

    location = Path(cfg.dataset)
    try:
        if location.is_dir() and any((location / n).exists() for n in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(location))
            return loaded[cfg.dataset_split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if location.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(location), split=cfg.dataset_split)
        if location.is_file():
            kind = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(location.suffix)
            if kind is None:
                raise DataSourceError(f"data.dataset: {location} is not a .json/.jsonl/.csv/.parquet file")
            return datasets.load_dataset(kind, data_files=str(location), split=cfg.dataset_split)
        return datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.dataset_split)
    except DataSourceError:
        raise
    except Exception as err:
        raise DataSourceError(
            f"data.dataset: could not load {cfg.dataset!r} ({type(err).__name__}: {err}). If you are offline, "
            "download it once or point data.dataset at a local dataset folder or file."
        ) from err


def _dataset_image(value: Any, origin: str) -> Image.Image:
    """A dataset cell as an RGB image: a PIL image, a path, or a {'bytes'|'path'} dict."""
    from io import BytesIO

    from .images import to_rgb

    try:
        if isinstance(value, Image.Image):
            return to_rgb(value)
        if isinstance(value, dict):
            if value.get("bytes"):
                with Image.open(BytesIO(value["bytes"])) as image:
                    image.load()
                    return to_rgb(image)
            value = value.get("path")
        return open_rgb(value)
    except BadImageError:
        raise
    except Exception as err:
        raise BadImageError(f"{origin}: not a readable image ({err})") from err


def dataset_records(cfg: DataConfig) -> tuple[list[Record], SourceReport]:
    """Records from a `datasets` dataset, checking the configured columns before anything trains."""
    dataset = _load_dataset(cfg)
    columns = list(dataset.column_names)
    if cfg.image_column not in columns:
        raise DataSourceError(
            f"data.image_column: column {cfg.image_column!r} not in dataset {cfg.dataset!r}; columns: {columns}"
        )
    if cfg.caption_column is not None and cfg.caption_column not in columns:
        raise DataSourceError(
            f"data.caption_column: column {cfg.caption_column!r} not in dataset {cfg.dataset!r}; columns: {columns}"
        )
    if cfg.caption_column is None and not cfg.instance_prompt:
        raise DataSourceError("data.caption_column is null and data.instance_prompt is unset: no captions")
    captions = dataset[cfg.caption_column] if cfg.caption_column else [cfg.instance_prompt] * len(dataset)
    report, records = SourceReport(), []
    for index, caption in enumerate(captions):
        origin = f"{cfg.dataset}[{index}]"
        text = caption if isinstance(caption, str) else (caption[0] if caption else None)
        if not text and not cfg.instance_prompt:
            report.skipped.append((origin, "empty caption"))
            continue
        load = lambda i=index, o=origin: _dataset_image(dataset[i][cfg.image_column], o)  # noqa: E731
        records.append(Record(load=load, caption=(text or cfg.instance_prompt).strip(), origin=origin))
    report.used = len(records)
    if not records:
        raise DataSourceError(f"data.dataset: {cfg.dataset!r} has no usable rows")
    return records, report


def scan_records(cfg: DataConfig) -> tuple[list[Record], SourceReport]:
    """Records from whichever source ``cfg`` names."""
    cfg.require_source()
    return folder_records(cfg) if cfg.instance_dir else dataset_records(cfg)
