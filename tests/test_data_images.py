"""Every image mode to RGB, EXIF orientation, and every bad input reported clearly before training."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dreamtune.data.dataset import build_dataset
from dreamtune.data.images import open_rgb, to_rgb
from dreamtune.data.sources import DataSourceError

from .test_data_helpers import cfg, write_image


def test_modes_to_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    la = Image.new("LA", (4, 4), (0, 255))
    assert to_rgb(la).getpixel((0, 0)) == (0, 0, 0)
    p = Image.new("P", (4, 4), 3)
    p.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    assert to_rgb(p).getpixel((0, 0)) == (10, 20, 30)
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)
    gray = Image.new("L", (4, 4), 128)
    assert to_rgb(gray).getpixel((0, 0)) == (128, 128, 128)
    for image in (rgba, la, p, cmyk, sixteen, gray, Image.new("1", (4, 4), 1)):
        assert to_rgb(image).mode == "RGB"


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif)
    assert open_rgb(path).size == (20, 60)
    ds = build_dataset(cfg(instance_dir=str(tmp_path), instance_prompt="x"), seed=0)
    assert ds.records[0].size == (20, 60)


def make_bad_folder(folder):
    write_image(folder / "good.png", size=(64, 64), caption="good")
    (folder / "zero.png").write_bytes(b"")
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (1, 2, 3)).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    write_image(folder / "latin1.png", size=(64, 64))
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    write_image(folder / "tiny.png", size=(8, 8), caption="tiny")
    write_image(folder / "dup.png", size=(64, 64), caption="shared")
    write_image(folder / "dup.jpg", size=(64, 64))


def test_bad_inputs_are_skipped_and_summarised(tmp_path):
    make_bad_folder(tmp_path)
    ds = build_dataset(cfg(instance_dir=str(tmp_path), resolution=64), seed=0)
    names = sorted(r.origin.rsplit("/", 1)[-1] for r in ds.records)
    assert names == ["dup.jpg", "dup.png", "good.png", "tiny.png"]
    skipped = {p.rsplit("/", 1)[-1]: why for p, why in ds.report.skipped}
    assert skipped["zero.png"] == "empty file (0 bytes)"
    assert "image file is truncated" in skipped["truncated.jpg"]
    assert "not a readable image" in skipped["corrupt.png"]
    assert "latin1.txt is unreadable (UnicodeDecodeError); save it as UTF-8" in skipped["latin1.png"]
    warnings = "\n".join(f"{p}: {why}" for p, why in ds.report.warnings)
    assert "notes.pdf: not an image (.pdf), ignored" in warnings
    assert "duplicate stem: dup.jpg, dup.png share one caption file" in warnings
    assert "tiny.png: short side 8px, upscaled to 64px" in warnings
    summary = ds.report.summary()
    assert summary.startswith("data: 4 images used, 4 skipped")


def test_min_image_side_skips_small_images(tmp_path):
    write_image(tmp_path / "big.png", size=(64, 64), caption="big")
    write_image(tmp_path / "small.png", size=(16, 16), caption="small")
    ds = build_dataset(cfg(instance_dir=str(tmp_path), min_image_side=32), seed=0)
    assert [r.caption for r in ds.records] == ["big"]
    assert ds.report.skipped[0][1] == "short side 16px < data.min_image_side=32"


def test_no_caption_anywhere_names_the_fix(tmp_path):
    write_image(tmp_path / "a.png")
    with pytest.raises(DataSourceError, match=r"(?s)no usable images.*no caption: add a.txt, set data.instance_prompt"):
        build_dataset(cfg(instance_dir=str(tmp_path)), seed=0)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataSourceError, match=r"data.instance_dir: .*nope is not a folder"):
        build_dataset(cfg(instance_dir=str(tmp_path / "nope")), seed=0)
    with pytest.raises(DataSourceError, match=r"data.instance_dir: no usable images in"):
        build_dataset(cfg(instance_dir=str(tmp_path)), seed=0)
    with pytest.raises(DataSourceError, match="no images to train on"):
        build_dataset(cfg(), seed=0)


def test_file_broken_after_scan_uses_a_neighbour(tmp_path):
    write_image(tmp_path / "a.png", caption="a")
    write_image(tmp_path / "b.png", caption="b")
    ds = build_dataset(cfg(instance_dir=str(tmp_path)), seed=0)
    (tmp_path / "a.png").write_bytes(b"")
    assert ds[0]["caption"] == "b"


@pytest.mark.parametrize("center_crop", [True, False])
def test_a_wide_image_is_cropped_not_squashed(tmp_path, center_crop):
    """A disc in a 5:4 photo stays round at 32x32: the image is scaled to cover the square, then cropped.

    Any crop of the scaled 40x32 image keeps the whole disc, so the random crop is checked too.
    """
    from PIL import ImageDraw

    image = Image.new("RGB", (60, 48), "white")
    ImageDraw.Draw(image).ellipse((18, 12, 42, 36), fill="black")  # 24 px across, 24 px high
    image.save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a disc")
    example = build_dataset(cfg(instance_dir=str(tmp_path), center_crop=center_crop), seed=0)[0]
    dark = (example["pixel_values"].mean(0) < 0).numpy()
    assert example["pixel_values"].shape == (3, 32, 32)
    rows, cols = np.nonzero(dark.any(1))[0], np.nonzero(dark.any(0))[0]
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(height - 16) <= 1 and abs(width - 16) <= 1, (height, width)  # squashed: 16 high, 13 wide
