"""validation.loss_every: the held-out loss is the same for the same weights across a resume (and, in
test_multiprocess, across 1 vs 2 processes), and it follows training."""

from __future__ import annotations

import json
import math

import pytest

from dreamtune.config import ConfigError
from dreamtune.training.loop import Trainer, train

from .conftest import REPO_ROOT, tiny_run_config

HELD_OUT = REPO_ROOT / "examples" / "sks_toy"


def config(model_dir, out, *overrides):
    return tiny_run_config("tiny_lora.yaml", model_dir, out, "validation.prompts=[]", "train.learning_rate=1e-2",
                           "validation.loss_every=2", f"validation.instance_dir={HELD_OUT}", *overrides)


def test_held_out_loss_is_identical_across_a_resume(tiny_model_dir, tmp_path):
    straight = train(config(tiny_model_dir, tmp_path / "straight", "train.max_steps=4", "train.save_every=2"))
    assert sorted(straight.validation_losses) == [0, 2, 4] and all(math.isfinite(v) for v in straight.validation_losses.values())
    logged = [json.loads(line) for line in (tmp_path / "straight" / "logs" / "validation_loss.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [0, 2, 4]
    assert logged[-1]["val_loss"] == straight.validation_losses[4]
    assert logged[0]["val_loss"] != logged[-1]["val_loss"], "training moved the held-out loss"

    # Stopped after 3 steps (the checkpoint is at 2), then resumed from it to 4.
    out = tmp_path / "resumed"
    first = train(config(tiny_model_dir, out, "train.max_steps=3", "train.save_every=2"))
    assert first.validation_losses[2] == straight.validation_losses[2]
    resumed = train(config(tiny_model_dir, out, "train.max_steps=4", "train.save_every=2", "train.resume=auto"))
    assert sorted(resumed.validation_losses) == [4], "the second run resumed from step 2"
    assert resumed.validation_losses[4] == straight.validation_losses[4]  # bit for bit


def test_the_same_weights_give_the_same_loss_and_images_are_not_trained_on(tiny_model_dir, tmp_path):
    trainer = Trainer(config(tiny_model_dir, tmp_path / "a", "train.max_steps=1", "train.save_every=0"))
    trainer._setup()
    first, second = trainer.validation_loss(0), trainer.validation_loss(0)
    assert first == second and math.isfinite(first)
    assert len(trainer.validation_loss.dataset) == 6


def test_loss_every_needs_a_held_out_folder(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="validation.loss_every needs validation.instance_dir"):
        tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, "validation.loss_every=2")


def test_keep_best_spares_the_lowest_held_out_loss_through_rotation(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = train(config(tiny_model_dir, out, "train.max_steps=8", "train.save_every=2",
                          "train.checkpoints_total_limit=1", "validation.keep_best=1", "train.learning_rate=5e-2"))
    kept = {int(p.name.split("-")[1]): json.loads((p / "trainer_state.json").read_text())["val_loss"]
            for p in (out / "checkpoints").glob("step-*")}
    saved = {step: loss for step, loss in result.validation_losses.items() if step in (2, 4, 6)}
    best = min(saved, key=saved.get)
    assert set(kept) == {best, 6}, (kept, saved)  # the newest, and the best (which may be the newest)
    assert all(kept[step] == saved[step] for step in kept)
    with pytest.raises(ConfigError, match=r"make train.save_every \(3\) a multiple of validation.loss_every \(2\)"):
        config(tiny_model_dir, tmp_path / "x", "train.save_every=3", "validation.keep_best=1")


def test_rotation_keeps_the_newest_and_the_best_by_held_out_loss(tmp_path):
    from dreamtune.training import checkpoints as ckpt

    losses = {2: 0.30, 4: 0.10, 6: 0.20, 8: 0.25, 10: 0.40}
    for step, loss in losses.items():
        folder = tmp_path / ckpt.checkpoint_name(step)
        folder.mkdir()
        ckpt.write_state(folder, {"global_step": step, "fingerprint": "f", "val_loss": loss})
    ckpt.rotate(tmp_path, keep=1, fingerprint="f", keep_best=2)
    assert sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("step-*")) == [4, 6, 10]
    ckpt.rotate(tmp_path, keep=1, fingerprint="f", keep_best=0)
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-000010"]
