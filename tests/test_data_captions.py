"""Caption rules: templates, prefix/suffix, tag shuffle with keep_tokens, dropout, long-caption count."""

from __future__ import annotations

from dreamtune.data.caption_rules import (CaptionRules, base_caption, caption_rng, count_long_captions,
                                          render_caption)

TAGS = "sks, dog, grass, sunny, park, red collar"


def test_template_and_own_caption_precedence():
    rules = CaptionRules(instance_prompt="a photo of {token} {class}", token="sks", class_name="dog")
    assert base_caption(None, rules) == "a photo of sks dog"
    assert base_caption("my {token} on a beach", rules) == "my sks on a beach"
    assert base_caption(None, CaptionRules(), fallback="sks dog") == "sks dog"
    assert base_caption(None, CaptionRules()) is None


def test_prefix_and_suffix():
    rules = CaptionRules(prefix="sks,", suffix="highly detailed")
    assert render_caption("a dog", rules, caption_rng(0, 0, 0)) == "sks, a dog highly detailed"


def test_shuffle_keeps_first_tags_and_is_deterministic():
    rules = CaptionRules(shuffle_tags=True, keep_tokens=2)
    outs = {render_caption(TAGS, rules, caption_rng(1, epoch, 3)) for epoch in range(20)}
    assert len(outs) > 1
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "dog"] and sorted(tags) == sorted(TAGS.split(", "))
    assert render_caption(TAGS, rules, caption_rng(1, 2, 3)) == render_caption(TAGS, rules, caption_rng(1, 2, 3))


def test_caption_dropout_rates():
    never, always = CaptionRules(caption_dropout=0.0), CaptionRules(caption_dropout=1.0)
    assert all(render_caption(TAGS, never, caption_rng(0, 0, i)) == TAGS for i in range(50))
    assert all(render_caption(TAGS, always, caption_rng(0, 0, i)) == "" for i in range(50))


def test_tag_dropout_never_drops_kept_tags():
    rules = CaptionRules(tag_dropout=1.0, keep_tokens=1)
    assert render_caption(TAGS, rules, caption_rng(0, 0, 0)) == "sks"
    half = CaptionRules(tag_dropout=0.5)
    lengths = {len(render_caption(TAGS, half, caption_rng(0, 0, i)).split(", ")) for i in range(50)}
    assert len(lengths) > 2


def test_dataset_applies_rules_per_epoch(tmp_path):
    from dreamtune.data.dataset import build_dataset

    from .test_data_helpers import cfg, write_image

    write_image(tmp_path / "a.png", caption=TAGS)
    ds = build_dataset(cfg(instance_dir=str(tmp_path), shuffle_tags=True, keep_tokens=1), seed=3)
    first = ds[0]["caption"]
    assert ds[0]["caption"] == first
    epochs = set()
    for epoch in range(10):
        ds.set_epoch(epoch)
        epochs.add(ds[0]["caption"])
    assert len(epochs) > 1 and all(c.startswith("sks, ") for c in epochs)


class WordTokenizer:
    """Counts words plus begin/end tokens, like CLIP's does for plain words."""

    def __call__(self, texts, truncation=False, padding=False):
        return {"input_ids": [[0] + t.split() + [1] for t in texts]}


def test_count_long_captions():
    captions = ["short caption", " ".join(["w"] * 75), " ".join(["w"] * 76), ""]
    assert count_long_captions(captions, WordTokenizer()) == 1
    assert count_long_captions(captions, WordTokenizer(), max_length=10) == 2


def test_long_caption_warning_from_loader(tmp_path, capsys):
    from dreamtune.data.loader import build_train_loader

    from .test_data_helpers import cfg, write_image

    write_image(tmp_path / "a.png", caption=" ".join(["w"] * 100))
    write_image(tmp_path / "b.png", caption="short")
    build_train_loader(cfg(instance_dir=str(tmp_path)), batch_size=1, seed=0, tokenizer=WordTokenizer())
    assert "1 of 2 images have captions longer than the text encoder's 77 tokens" in capsys.readouterr().out


def test_long_caption_warning_on_rank_zero_only(tmp_path, capsys):
    from dreamtune.data.loader import build_train_loader

    from .test_data_helpers import cfg, write_image

    write_image(tmp_path / "a.png", caption=" ".join(["w"] * 100))
    write_image(tmp_path / "b.png", caption="short")
    build_train_loader(cfg(instance_dir=str(tmp_path)), batch_size=1, seed=0, num_replicas=2, rank=1,
                       tokenizer=WordTokenizer())
    assert "longer than" not in capsys.readouterr().out


def test_data_notices_are_shown_once_without_logging_configured(tmp_path):
    """A plain script (no logging set up) sees each data notice once, on stdout, and nothing on stderr."""
    import subprocess
    import sys

    from .test_data_helpers import write_image

    for i in range(2):
        write_image(tmp_path / f"{i}.png", caption=" ".join(["w"] * (100 if i == 0 else 2)))
    script = f"""
from dreamtune.data.config import DataConfig
from dreamtune.data.loader import build_train_loader
class Words:
    def __call__(self, texts, truncation=False, padding=False):
        return {{"input_ids": [[0] + t.split() + [1] for t in texts]}}
build_train_loader(DataConfig(resolution=32, instance_dir={str(tmp_path)!r}), batch_size=4, seed=0, tokenizer=Words())
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("1 of 2 images have captions longer than") == 1
    assert run.stdout.count("2 examples per epoch but 4 per step") == 1
    assert "examples per epoch" not in run.stderr and "longer than" not in run.stderr


def test_prefix_and_suffix_fill_token_and_class():
    rules = CaptionRules(token="sks", class_name="dog", prefix="photo of {token},", suffix=", a {class}",
                         shuffle_tags=True, keep_tokens=1)
    text = render_caption("tree, river", rules, caption_rng(0, 0, 0))
    assert text.startswith("photo of sks, tree") and text.endswith(", a dog") and "{" not in text


def test_long_caption_count_includes_the_prefix(tmp_path, capsys):
    from dreamtune.data.loader import build_train_loader

    from .test_data_helpers import cfg, write_image

    write_image(tmp_path / "a.png", caption=" ".join(["w"] * 60))
    write_image(tmp_path / "b.png", caption="short")
    c = cfg(instance_dir=str(tmp_path), caption_prefix=" ".join(["{token}"] * 20), token="sks")
    build_train_loader(c, batch_size=1, seed=0, tokenizer=WordTokenizer())
    assert "1 of 2 images have captions longer than the text encoder's 77 tokens" in capsys.readouterr().out
