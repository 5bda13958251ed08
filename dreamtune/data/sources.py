"""Sources of (image, caption) records: image folders with sidecar/metadata captions, or `datasets` datasets."""

from __future__ import annotations

import csv
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from ..errors import DataError
from .caption_rules import CaptionRules, base_caption
from .config import DataConfig, SourceConfig
from .images import IMAGE_EXTENSIONS, BadImageError, open_rgb
from .masks import attach_masks

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_EXTENSIONS = (".txt", ".caption")
REPEAT_FOLDER = re.compile(r"(\d+)_(.+)")
EXIF_ORIENTATION = 0x0112


class DataSourceError(DataError):
    """A source that cannot give any usable image; the message names the path or column and the fix."""


@dataclass
class Record:
    """One training example before transforms: how to get its image, its caption and its rules."""

    load: Callable[[], Image.Image]
    caption: str
    origin: str
    repeats: int = 1
    rules: CaptionRules | None = None
    size: tuple[int, int] | None = None
    identity: str = ""
    mask: Callable[[], Image.Image] | None = None  # data.masked_loss: the loss mask's loader (see data/masks.py)

    def cache_identity(self) -> str:
        """What names this image's content for caches (path, size on disk and mtime for files)."""
        return self.identity or self.origin


@dataclass
class SourceReport:
    """What a scan used and what it skipped or warned about, with the reason per file."""

    used: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)

    def extend(self, other: "SourceReport") -> None:
        self.used += other.used
        self.skipped += other.skipped
        self.warnings += other.warnings

    def summary(self) -> str:
        lines = [f"data: {self.used} images used, {len(self.skipped)} skipped, {len(self.warnings)} warnings"]
        for label, items in (("skipped", self.skipped), ("warning", self.warnings)):
            lines += [f"  {label} {origin}: {why}" for origin, why in items[:20]]
            if len(items) > 20:
                lines.append(f"  ... and {len(items) - 20} more {label}")
        return "\n".join(lines)


def inspect_image(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """Fully decode ``path`` (catches truncated files verify() lets through); return (size, problem)."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file (0 bytes)"
        with Image.open(path) as image:
            image.load()
            width, height = image.size
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Image.DecompressionBombError as err:
        return None, f"image too large to open safely ({err})"
    except Exception as err:  # PIL raises many kinds for broken files
        return None, f"not a readable image ({type(err).__name__}: {err}); re-export or delete it"
    return ((height, width) if orientation in (5, 6, 7, 8) else (width, height)), None


def _read_sidecar(image_path: Path, extensions: list[str]) -> tuple[str | None, str | None]:
    """Return (caption, problem) from the first sidecar file found next to ``image_path``."""
    for ext in extensions:
        sidecar = image_path.with_suffix(ext)
        if sidecar.is_file():
            try:
                text = sidecar.read_text(encoding="utf-8").strip()
            except (UnicodeDecodeError, OSError) as err:
                return None, f"caption file {sidecar} is unreadable ({type(err).__name__}); save it as UTF-8"
            return (text or None), None
    return None, None


def _read_metadata(root: Path, caption_column: str) -> tuple[dict[str, str], Path | None]:
    """Captions by relative file name from ``metadata.jsonl``/``metadata.csv`` in ``root``."""
    for name in METADATA_FILES:
        path = root / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as err:
            raise DataSourceError(f"{path}: unreadable ({type(err).__name__}); save it as UTF-8") from err
        if name.endswith(".jsonl"):
            rows = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataSourceError(f"{path}: line {number} is not JSON ({err.msg}); fix or remove it") from err
        else:
            rows = list(csv.DictReader(text.splitlines()))
        for row in rows:
            missing = [c for c in ("file_name", caption_column) if c not in row]
            if missing:
                raise DataSourceError(
                    f"{path}: a row lacks column(s) {missing}; every row needs 'file_name' and {caption_column!r} "
                    "(or set caption_column to the caption's column name)"
                )
        return {str(Path(r["file_name"])): str(r[caption_column] or "").strip() for r in rows}, path
    return {}, None


def _repeat_folder(path: Path, root: Path) -> tuple[int | None, str | None]:
    """(repeats, words) from the nearest kohya-style '10_sks dog' folder between ``path`` and ``root``."""
    folder = path.parent
    while True:
        match = REPEAT_FOLDER.fullmatch(folder.name)
        if match:
            return int(match.group(1)), match.group(2).replace("_", " ").strip()
        if folder == root or folder == folder.parent:
            return None, None
        folder = folder.parent


def _file_identity(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def folder_records(
    source: SourceConfig, cfg: DataConfig, key: str = "data"
) -> tuple[list[Record], SourceReport]:
    """Scan ``source.instance_dir`` recursively; broken files are skipped and reported, not fatal."""
    root = Path(source.instance_dir or "")
    if not root.is_dir():
        raise DataSourceError(f"{key}.instance_dir: {root} is not a folder; point it at a folder of images")
    rules = CaptionRules.from_source(source)
    extensions = list(dict.fromkeys([source.caption_extension, *CAPTION_EXTENSIONS]))
    metadata, metadata_path = ({}, None) if source.ignore_captions else _read_metadata(
        root, source.caption_column or "text")
    report = SourceReport()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(root).parts))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    for path in files:
        if path.suffix.lower() not in IMAGE_EXTENSIONS and path.suffix.lower() not in extensions \
                and path.name not in METADATA_FILES:
            report.warnings.append((str(path), f"not an image ({path.suffix or 'no extension'}), ignored"))
    _warn_shared_stems(images, report)
    known = {str(p.relative_to(root)) for p in images}
    for name in metadata:
        if name not in known:
            report.warnings.append((f"{metadata_path}", f"names {name}, which is not an image in {root}"))
    with ThreadPoolExecutor(max_workers=4) as pool:
        inspected = list(pool.map(inspect_image, images))
    records = []
    for path, (size, problem) in zip(images, inspected):
        own, problem2 = (None, None) if source.ignore_captions else _read_sidecar(path, extensions)
        problem = problem or problem2
        own = own or metadata.get(str(path.relative_to(root))) or None  # metadata is empty with ignore_captions
        folder_repeats, folder_words = _repeat_folder(path, root)
        caption = base_caption(own, rules, fallback=folder_words)
        if problem is None and caption is None:
            empty = next((path.with_suffix(e) for e in extensions if path.with_suffix(e).is_file()), None)
            fix = f"write a caption into {empty.name} (it is empty)" if empty else f"add {path.with_suffix(extensions[0]).name}"
            problem = f"no caption: {fix}, set {key}.instance_prompt, or name the folder like '10_sks dog'"
        if problem is None and size is not None:
            problem = _size_problem(size, cfg, report, str(path))
        if problem:
            report.skipped.append((str(path), problem))
            continue
        records.append(Record(
            load=_PathLoader(path), caption=caption, origin=str(path), repeats=folder_repeats or source.repeats,
            rules=rules, size=size, identity=_file_identity(path),
        ))
    report.used = len(records)
    if not records:
        raise DataSourceError(
            f"{key}.instance_dir: no usable images in {root} "
            f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}).\n{report.summary()}"
        )
    return records, report


@dataclass(frozen=True)
class _PathLoader:
    """A picklable loader (DataLoader workers) for one image file."""

    path: Path

    def __call__(self) -> Image.Image:
        return open_rgb(self.path)


def _warn_shared_stems(images: list[Path], report: SourceReport) -> None:
    """Report images that share a stem (a.png and a.jpg would share a.txt)."""
    by_stem: dict[Path, list[Path]] = {}
    for path in images:
        by_stem.setdefault(path.with_suffix(""), []).append(path)
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            report.warnings.append((str(stem), f"duplicate stem: {names} share one caption file; rename one"))


def _size_problem(size: tuple[int, int], cfg: DataConfig, report: SourceReport, origin: str) -> str | None:
    """Skip below data.min_image_side; warn when the image is far (2x) smaller than the resolution."""
    short = min(size)
    if cfg.min_image_side and short < cfg.min_image_side:
        return f"short side {short}px < data.min_image_side={cfg.min_image_side}"
    if short * 2 < cfg.resolution and not cfg.bucket_no_upscale:
        report.warnings.append((origin, f"short side {short}px, upscaled to {cfg.resolution}px (blurry); "
                                        "set data.min_image_side to skip such images"))
    return None


def load_hf_dataset(source: SourceConfig, streaming: bool = False, key: str = "data") -> Any:
    """Open ``source.dataset`` as a hub id, a `save_to_disk` folder, an image folder or a data file."""
    import datasets

    location = Path(source.dataset)
    split = source.dataset_split
    try:
        if location.is_dir() and any((location / n).exists() for n in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(location))
            loaded = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
            return loaded.to_iterable_dataset(num_shards=max(1, min(64, len(loaded)))) if streaming else loaded
        if location.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(location), split=split, streaming=streaming)
        if location.is_file():
            kind = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(location.suffix)
            if kind is None:
                raise DataSourceError(f"{key}.dataset: {location} is not a .json/.jsonl/.csv/.parquet file")
            return datasets.load_dataset(kind, data_files=str(location), split=split, streaming=streaming)
        return datasets.load_dataset(source.dataset, source.dataset_config, split=split, streaming=streaming)
    except DataSourceError:
        raise
    except Exception as err:
        raise DataSourceError(
            f"{key}.dataset: could not load {source.dataset!r} ({type(err).__name__}: {err}). If you are offline, "
            "download it once or point data.dataset at a local dataset folder or file."
        ) from err


def check_columns(columns: list[str] | None, source: SourceConfig, key: str = "data") -> None:
    """Fail early, naming the key and the columns there are, when a configured column is missing."""
    if columns is None:
        return
    if source.image_column not in columns:
        raise DataSourceError(
            f"{key}.image_column: column {source.image_column!r} not in dataset {source.dataset!r}; "
            f"columns: {columns}; set {key}.image_column to one of them"
        )
    if source.own_caption_column is not None and source.own_caption_column not in columns:
        raise DataSourceError(
            f"{key}.caption_column: column {source.caption_column!r} not in dataset {source.dataset!r}; "
            f"columns: {columns}; set {key}.caption_column to one of them (or null to use instance_prompt)"
        )
    if source.caption_column is None and not source.instance_prompt:
        raise DataSourceError(f"{key}.caption_column is null and {key}.instance_prompt is unset: no captions")


def dataset_image(value: Any, origin: str) -> Image.Image:
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


def cell_caption(value: Any) -> str | None:
    """A caption cell as text: a string, or the first of a list of strings."""
    text = value if isinstance(value, str) else (value[0] if value else None)
    return text.strip() if isinstance(text, str) and text.strip() else None


@dataclass(frozen=True)
class _RowLoader:
    """A picklable loader for one row's image."""

    dataset: Any
    index: int
    column: str
    origin: str

    def __call__(self) -> Image.Image:
        return dataset_image(self.dataset[self.index][self.column], self.origin)


def dataset_records(source: SourceConfig, key: str = "data") -> tuple[list[Record], SourceReport]:
    """Records from a `datasets` dataset, checking the configured columns before anything trains."""
    dataset = load_hf_dataset(source, key=key)
    check_columns(list(dataset.column_names), source, key)
    rules = CaptionRules.from_source(source)
    column = source.own_caption_column
    captions = dataset[column] if column else [None] * len(dataset)
    fingerprint = getattr(dataset, "_fingerprint", source.dataset)
    report, records = SourceReport(), []
    for index, value in enumerate(captions):
        origin = f"{source.dataset}[{index}]"
        caption = base_caption(cell_caption(value), rules)
        if caption is None:
            report.skipped.append((origin, f"empty caption and no {key}.instance_prompt"))
            continue
        records.append(Record(
            load=_RowLoader(dataset, index, source.image_column, origin), caption=caption, origin=origin,
            repeats=source.repeats, rules=rules, identity=f"{fingerprint}:{index}",
        ))
    report.used = len(records)
    if not records:
        raise DataSourceError(f"{key}.dataset: {source.dataset!r} has no usable rows\n{report.summary()}")
    return records, report


def source_key(cfg: DataConfig, index: int) -> str:
    """The config path that names source ``index`` in messages."""
    return f"data.sources[{index}]" if cfg.sources else "data"


def scan_records(cfg: DataConfig) -> tuple[list[Record], SourceReport]:
    """Records from every configured source, with one combined report."""
    try:
        cfg.require_source()
    except ValueError as err:
        raise DataSourceError(str(err)) from err
    records, report = [], SourceReport()
    for index, source in enumerate(cfg.source_configs()):
        key = source_key(cfg, index)
        found, part = folder_records(source, cfg, key) if source.instance_dir else dataset_records(source, key)
        if cfg.masked_loss:
            attach_masks(found, Path(source.instance_dir), cfg.mask_dir, key)
        records += found
        report.extend(part)
    return records, report
