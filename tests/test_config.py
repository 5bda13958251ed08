"""Config: every shipped YAML validates; every bad config stops early with a message naming the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreamtune.config import ConfigError, dump_config, load_config, validate_config
from dreamtune.toyworld.paths import RECIPE_DIR

from .conftest import REPO_ROOT

SHIPPED = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert len(SHIPPED) >= 2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path):
    text = path.read_text()
    assert text.startswith("#") and "--config configs/" + path.name in text, "open with the launch command"
    cfg = load_config(path)
    assert cfg.trainer in ("lora", "dreambooth", "textual_inversion", "pivotal")
    assert getattr(cfg, cfg.trainer) is not None
    # The resolved config round-trips through YAML unchanged.
    assert validate_config(__import__("yaml").safe_load(dump_config(cfg))) == cfg


RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_benchmark_recipe_validates(path: Path):
    """The toy-world recipes ship inside the package; those without a configs/ link are checked here."""
    assert path.read_text().startswith("#"), "open with what the recipe is and how to run it"
    cfg = load_config(path)
    assert validate_config(__import__("yaml").safe_load(dump_config(cfg))) == cfg


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def error_of(path, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_missing_file_is_named(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"config file not found: {tmp_path / 'nope.yaml'}"


def test_yaml_syntax_error_gives_the_line(tmp_path):
    path = write(tmp_path, "trainer: lora\nlora:\n  rank: [4\n")
    message = error_of(path)
    assert str(path) in message and "YAML syntax error" in message and "line 4" in message


def test_unknown_key_suggests_the_closest(tmp_path):
    message = error_of(write(tmp_path, "trainer: lora\nlora:\n  rnak: 4\n"))
    assert "unknown key 'lora.rnak' (did you mean lora.rank?)" in message
    assert "run.yaml" in message


def test_unknown_section_suggests_the_closest(tmp_path):
    assert "unknown key 'tarin' (did you mean train?)" in error_of(write(tmp_path, "trainer: lora\ntarin: {}\n"))


def test_wrong_type_and_range_name_the_key(tmp_path):
    message = error_of(write(tmp_path, "trainer: lora\ntrain:\n  max_steps: -5\n  learning_rate: fast\n"))
    assert "'train.max_steps'" in message and "-5" in message
    assert "'train.learning_rate'" in message and "'fast'" in message


def test_bad_trainer_lists_the_trainers(tmp_path):
    message = error_of(write(tmp_path, "trainer: lorra\n"))
    assert "'lorra' is not a trainer" in message
    assert "dreambooth, lora, pivotal, textual_inversion" in message


def test_missing_trainer(tmp_path):
    assert "missing key 'trainer'" in error_of(write(tmp_path, "train: {max_steps: 5}\n"))


def test_resolution_must_be_multiple_of_8(tmp_path):
    assert "multiple of 8" in error_of(write(tmp_path, "trainer: lora\ndata: {resolution: 100}\n"))


def test_overrides_apply_with_yaml_types(tmp_path):
    path = write(tmp_path, "trainer: lora\ntrain: {max_steps: 5}\n")
    cfg = load_config(path, ["train.max_steps=800", "data.instance_dir=photos/", "lora.rank=16",
                             "validation.prompts=[a dog, a cat]", "train.mixed_precision=bf16"])
    assert cfg.train.max_steps == 800 and cfg.data.instance_dir == "photos/" and cfg.lora.rank == 16
    assert cfg.validation.prompts == ["a dog", "a cat"] and cfg.train.mixed_precision == "bf16"


def test_mixed_precision_no_survives_yaml(tmp_path):
    """YAML 1.1 reads `no` as false; accelerate's spelling must still mean no mixed precision."""
    path = write(tmp_path, "trainer: lora\ntrain: {mixed_precision: no}\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert "mixed_precision" in error_of(write(tmp_path, "trainer: lora\ntrain: {mixed_precision: yes}\n"))


def test_bad_override_key_and_form(tmp_path):
    path = write(tmp_path, "trainer: lora\n")
    assert "did you mean train.max_steps?" in error_of(path, ["train.max_stpes=3"])
    assert "key.sub=value" in error_of(path, ["train.max_steps"])


def test_lora_section_defaults_when_absent(tmp_path):
    cfg = load_config(write(tmp_path, "trainer: lora\n"))
    assert cfg.lora.rank == 4 and cfg.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]


ACCELERATE_CONFIGS = sorted((REPO_ROOT / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_accelerate_config_parses(path: Path):
    """accelerate's own config reader accepts each launch recipe, and each documents its command."""
    from accelerate.commands.config.config_args import ClusterConfig

    assert path.read_text().startswith("#") and "accelerate launch --config_file configs/accelerate/" in path.read_text()
    cluster = ClusterConfig.from_yaml_file(str(path))
    assert cluster.num_processes >= 1 and cluster.distributed_type is not None


def test_accelerate_configs_exist():
    assert {p.name for p in ACCELERATE_CONFIGS} >= {"multi_gpu.yaml", "multi_node.yaml", "deepspeed_zero2.yaml"}
