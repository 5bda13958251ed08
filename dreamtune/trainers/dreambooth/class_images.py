"""Class images for DreamBooth prior preservation: found on disk, the missing ones generated.

Image ``i`` is always drawn from seed ``seed + i`` and written atomically as ``class-{i:05d}.png``
(with its prompt beside it as ``.txt``), so an interrupted generation resumes where it stopped and
yields the same set as an uninterrupted one. Real regularization photos in the folder count too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from ...data.config import DataConfig, SourceConfig
from ...data.sources import DataSourceError, Record, folder_records
from ...errors import DataError


class ProcessState(Protocol):
    """What generation needs of accelerate's Accelerator / PartialState."""

    process_index: int
    num_processes: int
    is_local_main_process: bool

    def wait_for_everyone(self) -> None: ...


def class_image_path(class_dir: Path, index: int) -> Path:
    """Where generated class image ``index`` lives."""
    return class_dir / f"class-{index:05d}.png"


def scan_class_images(class_dir: Path, class_prompt: str, data: DataConfig | None = None) -> list[Record]:
    """Readable images already in ``class_dir``, sorted by path; captions from sidecars, else ``class_prompt``."""
    if not class_dir.is_dir():
        return []
    data = data or DataConfig()
    source = SourceConfig(instance_dir=str(class_dir), instance_prompt=class_prompt,
                          caption_extension=data.caption_extension)
    try:
        return folder_records(source, data, key="dreambooth")[0]
    except DataSourceError:  # a folder without any usable image yet
        return []


def missing_indices(class_dir: Path, found: Sequence[Record], wanted: int) -> list[int]:
    """The first ``wanted - len(found)`` indices whose class-NNNNN.png is not already a readable image."""
    present = {Path(record.origin).resolve() for record in found}
    todo, index = [], 0
    while len(todo) < wanted - len(found):
        if class_image_path(class_dir, index).resolve() not in present:
            todo.append(index)
        index += 1
    return todo


def _write_atomic(image, caption: str, path: Path) -> None:
    """Caption first, then the image renamed into place: a readable image always has its caption."""
    path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


@torch.no_grad()
def generate_class_images(
    pipe: Any,
    class_dir: Path,
    prompt: str,
    indices: Sequence[int],
    *,
    seed: int,
    batch_size: int,
    steps: int,
    resolution: int,
    show_progress: bool = True,
) -> list[Path]:
    """Render ``indices`` in batches, image ``i`` from its own generator seeded ``seed + i``."""
    from tqdm.auto import tqdm

    class_dir.mkdir(parents=True, exist_ok=True)
    written = []
    batches = [list(indices[k : k + batch_size]) for k in range(0, len(indices), batch_size)]
    for batch in tqdm(batches, desc="class images", disable=not show_progress, dynamic_ncols=True):
        generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in batch]
        images = pipe(
            [prompt] * len(batch), num_inference_steps=steps, height=resolution, width=resolution, generator=generators
        ).images
        for index, image in zip(batch, images):
            path = class_image_path(class_dir, index)
            _write_atomic(image, prompt, path)
            written.append(path)
    return written


def prepare_class_images(
    state: ProcessState,
    make_pipeline: Callable[[], Any],
    class_dir: str | Path,
    class_prompt: str,
    num_images: int,
    *,
    seed: int,
    batch_size: int,
    steps: int,
    resolution: int,
    data: DataConfig | None = None,
) -> tuple[list[Record], int]:
    """Make sure ``class_dir`` holds ``num_images`` images; returns (records, how many this process generated).

    Every process scans, then each renders its share of the missing indices (round-robin by process),
    then all wait; a folder that already holds enough is used as is.
    """
    class_dir = Path(class_dir)
    todo = missing_indices(class_dir, scan_class_images(class_dir, class_prompt, data), num_images)
    state.wait_for_everyone()  # every process has scanned before anyone writes
    mine = todo[state.process_index :: state.num_processes]
    if state.is_local_main_process and todo:
        print(f"dreambooth: generating {len(todo)} class images of {class_prompt!r} into {class_dir}")
    if mine:
        generate_class_images(
            make_pipeline(), class_dir, class_prompt, mine, seed=seed, batch_size=batch_size, steps=steps,
            resolution=resolution, show_progress=state.is_local_main_process,
        )
    state.wait_for_everyone()
    records = scan_class_images(class_dir, class_prompt, data)
    if len(records) < num_images:
        raise DataError(
            f"dreambooth.class_dir: {class_dir} holds {len(records)} readable images after generation, "
            f"{num_images} needed (dreambooth.num_class_images); check the folder is writable and not shared "
            "with another run"
        )
    return records[:num_images], len(mine)
