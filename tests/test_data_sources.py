"""Every source kind: folders with sidecars/metadata/repeat folders, several sources, datasets, streaming."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dreamtune.data.config import DataConfig
from dreamtune.data.dataset import build_dataset
from dreamtune.data.loader import build_train_loader
from dreamtune.data.sources import DataSourceError, scan_records

from .test_data_helpers import cfg, write_image


def captions_by_name(dataset) -> dict[str, str]:
    return {r.origin.rsplit("/", 1)[-1]: r.caption for r in dataset.records}


def test_folder_recursive_with_txt_and_caption_sidecars(tmp_path):
    write_image(tmp_path / "a.png", caption="a red thing")
    write_image(tmp_path / "sub" / "deep" / "b.jpg", caption="kohya style", ext=".caption")
    write_image(tmp_path / "c.png")
    ds = build_dataset(cfg(instance_dir=str(tmp_path), instance_prompt="a photo of sks"), seed=0)
    assert captions_by_name(ds) == {"a.png": "a red thing", "b.jpg": "kohya style", "c.png": "a photo of sks"}
    example = ds[0]
    assert example["pixel_values"].shape == (3, 32, 32)


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_metadata_file_captions(tmp_path, kind):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "sub" / "b.png")
    if kind == "jsonl":
        rows = [{"file_name": "a.png", "text": "first"}, {"file_name": "sub/b.png", "text": "second"}]
        (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    else:
        (tmp_path / "metadata.csv").write_text("file_name,text\na.png,first\nsub/b.png,second\n", encoding="utf-8")
    ds = build_dataset(cfg(instance_dir=str(tmp_path)), seed=0)
    assert captions_by_name(ds) == {"a.png": "first", "b.png": "second"}
    assert ds.report.skipped == []


def test_metadata_missing_column_names_the_file(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "x"}), encoding="utf-8")
    with pytest.raises(DataSourceError, match=r"metadata.jsonl: a row lacks column\(s\) \['text'\]"):
        build_dataset(cfg(instance_dir=str(tmp_path)), seed=0)


def test_repeat_folders_set_repeats_and_fallback_caption(tmp_path):
    write_image(tmp_path / "10_sks dog" / "a.png")
    write_image(tmp_path / "10_sks dog" / "b.png", caption="own caption")
    write_image(tmp_path / "1_dog" / "c.png")
    ds = build_dataset(cfg(instance_dir=str(tmp_path)), seed=0)
    by_name = {r.origin.rsplit("/", 1)[-1]: r for r in ds.records}
    assert by_name["a.png"].caption == "sks dog" and by_name["a.png"].repeats == 10
    assert by_name["b.png"].caption == "own caption"
    assert by_name["c.png"].caption == "dog" and by_name["c.png"].repeats == 1
    assert len(ds) == 21


def test_repeats_key_and_instance_prompt_template(tmp_path):
    write_image(tmp_path / "a.png")
    c = cfg(instance_dir=str(tmp_path), instance_prompt="a photo of {token} {class}", token="sks",
            class_name="dog", repeats=3)
    ds = build_dataset(c, seed=0)
    assert len(ds) == 3 and ds.records[0].caption == "a photo of sks dog"


def test_several_sources_each_with_own_rules(tmp_path):
    write_image(tmp_path / "subject" / "a.png")
    write_image(tmp_path / "style" / "b.png", caption="watercolor, tree")
    c = DataConfig(resolution=32, token="sks", sources=[
        {"instance_dir": str(tmp_path / "subject"), "instance_prompt": "a photo of {token} toy", "repeats": 4},
        {"instance_dir": str(tmp_path / "style"), "caption_prefix": "in the style of {token},"},
    ])
    ds = build_dataset(c, seed=0)
    assert len(ds) == 5
    captions = sorted(ds.caption_for(i) for i in range(len(ds)))
    assert captions == ["a photo of sks toy"] * 4 + ["in the style of sks, watercolor, tree"]


def test_sources_and_shorthand_together_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="either data.sources or the single-source shorthand"):
        DataConfig(instance_dir=str(tmp_path), sources=[{"instance_dir": str(tmp_path)}])


def test_an_empty_source_among_several_is_named(tmp_path):
    write_image(tmp_path / "ok" / "a.png", caption="x")
    (tmp_path / "empty").mkdir()
    c = DataConfig(sources=[{"instance_dir": str(tmp_path / "ok")}, {"instance_dir": str(tmp_path / "empty")}])
    with pytest.raises(DataSourceError, match=r"data.sources\[1\].instance_dir: no usable images in .*empty"):
        scan_records(c)


def test_a_second_source_over_one_folder_ignores_its_captions(tmp_path):
    """kohya's two subsets: each image once with its own caption and once as just the instance prompt."""
    write_image(tmp_path / "a.png", caption="a photo of a large {token}, center")
    write_image(tmp_path / "b.png", caption="a photo of a small {token}, top left")
    c = DataConfig(resolution=32, token="sks", sources=[
        {"instance_dir": str(tmp_path)},
        {"instance_dir": str(tmp_path), "ignore_captions": True, "instance_prompt": "a photo of {token}"},
    ])
    ds = build_dataset(c, seed=0)
    assert sorted(ds.caption_for(i) for i in range(len(ds))) == [
        "a photo of a large sks, center", "a photo of a small sks, top left", "a photo of sks", "a photo of sks"]


def test_ignore_captions_needs_an_instance_prompt_and_names_the_source(tmp_path):
    write_image(tmp_path / "a.png", caption="x")
    c = DataConfig(sources=[{"instance_dir": str(tmp_path)}, {"instance_dir": str(tmp_path), "ignore_captions": True}])
    with pytest.raises(DataSourceError, match=r"data.sources\[1\].ignore_captions=true .* set data.sources\[1\]"
                                              r".instance_prompt"):
        scan_records(c)
    inherited = DataConfig(instance_prompt="a photo of {token}", token="sks", sources=[
        {"instance_dir": str(tmp_path), "ignore_captions": True}])
    assert [r.caption for r in scan_records(inherited)[0]] == ["a photo of sks"]


def hf_dataset(n: int = 4):
    import datasets

    return datasets.Dataset.from_dict({
        "image": [Image.new("RGB", (40, 40), (i * 50, 0, 0)) for i in range(n)],
        "text": [f"caption {i}" for i in range(n)],
    }).cast_column("image", datasets.Image())


def test_local_saved_dataset_and_columns(tmp_path):
    hf_dataset().save_to_disk(str(tmp_path / "ds"))
    ds = build_dataset(cfg(dataset=str(tmp_path / "ds")), seed=0)
    assert sorted(r.caption for r in ds.records) == [f"caption {i}" for i in range(4)]
    assert ds[1]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(DataSourceError, match=r"data.caption_column: column 'prompt' not in dataset .*\['image', 'text'\]"):
        build_dataset(cfg(dataset=str(tmp_path / "ds"), caption_column="prompt"), seed=0)
    with pytest.raises(DataSourceError, match="data.image_column: column 'img'"):
        build_dataset(cfg(dataset=str(tmp_path / "ds"), image_column="img"), seed=0)
    ignored = build_dataset(cfg(dataset=str(tmp_path / "ds"), caption_column="prompt", ignore_captions=True,
                                instance_prompt="a photo of {token}", token="sks"), seed=0)
    assert [r.caption for r in ignored.records] == ["a photo of sks"] * 4


def test_local_data_file(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.png")
    rows = [{"image": str(tmp_path / f"{i}.png"), "prompt": f"row {i}"} for i in range(3)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    ds = build_dataset(cfg(dataset=str(tmp_path / "data.jsonl"), caption_column="prompt"), seed=0)
    assert [r.caption for r in ds.records] == ["row 0", "row 1", "row 2"]
    assert ds[2]["pixel_values"].shape == (3, 32, 32)


def test_streaming_dataset_shards_and_reshuffles(tmp_path):
    hf_dataset(8).save_to_disk(str(tmp_path / "ds"))
    c = cfg(dataset=str(tmp_path / "ds"), streaming=True, shuffle_buffer=4)
    seen = []
    for rank in range(2):
        loader = build_train_loader(c, batch_size=2, seed=0, num_replicas=2, rank=rank)
        assert loader.batches_per_epoch() == 2
        loader.set_epoch(0)
        seen.append([cap for batch in loader for cap in batch["captions"]])
    assert sorted(seen[0] + seen[1]) == [f"caption {i}" for i in range(8)]
    assert not set(seen[0]) & set(seen[1])
    loader = build_train_loader(c, batch_size=2, seed=0)
    loader.set_epoch(0)
    first = [cap for batch in loader for cap in batch["captions"]]
    loader.set_epoch(1)
    second = [cap for batch in loader for cap in batch["captions"]]
    assert sorted(first) == sorted(second) and first != second
    loader.set_epoch(1, skip_batches=1)
    assert [cap for batch in loader for cap in batch["captions"]] == second[2:]


def test_streaming_missing_column_and_ignored_captions(tmp_path):
    hf_dataset(2).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataSourceError, match="data.caption_column: column 'prompt'"):
        build_dataset(cfg(dataset=str(tmp_path / "ds"), streaming=True, caption_column="prompt"), seed=0)
    ignored = cfg(dataset=str(tmp_path / "ds"), streaming=True, ignore_captions=True,
                  instance_prompt="a photo of {token}", token="sks")
    loader = build_train_loader(ignored, batch_size=2, seed=0)
    loader.set_epoch(0)
    assert [cap for batch in loader for cap in batch["captions"]] == ["a photo of sks"] * 2
