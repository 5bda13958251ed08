"""The shared loop's runtime: exact resume, clean interruption, NaN guard, multi-process launch, early errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreamtune.data.sources import DataSourceError
from dreamtune.training import checkpoints as ckpt
from dreamtune.training.loop import Trainer, TrainingDiverged
from dreamtune.models.loading import ModelLoadError

from .conftest import REPO_ROOT, tiny_run_config


def config(model_dir: Path, out: Path, *overrides: str):
    return tiny_run_config(
        "tiny_lora.yaml",
        model_dir,
        out,
        "train.learning_rate=1.0e-2",
        "train.lr_scheduler=linear",
        "train.lr_warmup_steps=1",
        "validation.prompts=[]",
        *overrides,
    )


def interrupt_at(monkeypatch, step: int) -> None:
    """Send this process SIGTERM during micro-step ``step`` of the next run, as a user's Ctrl-C would."""
    import signal

    from dreamtune.training import loop

    original = loop.Trainer._train_step
    calls = {"n": 0}

    def step_then_signal(self, batch, micro_step):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, micro_step)

    monkeypatch.setattr(loop.Trainer, "_train_step", step_then_signal)


def test_resume_matches_a_straight_run(tiny_model_dir, tmp_path, monkeypatch):
    """6 steps straight == stop at 2, resume, stop at 4, resume to 6 (bitwise on the CPU); logged steps continue."""
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(config(tiny_model_dir, tmp_path / "straight", "train.max_steps=6", "train.save_every=0")).run()
    out = tmp_path / "resumed"
    steps = []
    for stop_after in (2, 2, None):
        with monkeypatch.context() as patch:
            if stop_after:
                interrupt_at(patch, stop_after)
            cfg = config(tiny_model_dir, out, "train.max_steps=6", "train.save_every=0", "train.resume=auto",
                         "train.checkpoints_total_limit=5", "logging.report_to=[tensorboard]", "logging.every=1")
            steps.append(Trainer(cfg).run().global_step)
    assert steps == [2, 4, 6]
    logged = []
    for events in sorted((out / "logs").rglob("events.out.tfevents.*")):
        reader = EventAccumulator(str(events), size_guidance={"scalars": 0})
        reader.Reload()
        logged += [e.step for e in reader.Scalars("loss")] if "loss" in reader.Tags()["scalars"] else []
    assert sorted(logged) == [1, 2, 3, 4, 5, 6], "the three runs' logged steps must continue, not restart or repeat"
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-000002", "step-000004"]
    exported = load_file(str(out / "diffusers" / "pytorch_lora_weights.safetensors"))
    expected = load_file(str(tmp_path / "straight" / "diffusers" / "pytorch_lora_weights.safetensors"))
    assert exported.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(exported[k], expected[k])] == []


def test_stop_request_checkpoints_and_resume_completes(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """SIGTERM mid-run: finish the step, checkpoint, export nothing, say how to resume; the resume finishes."""
    interrupt_at(monkeypatch, 2)
    cfg = config(tiny_model_dir, tmp_path, "train.max_steps=5", "train.save_every=0")
    result = Trainer(cfg).run()
    assert result.interrupted and result.global_step == 2
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if line.startswith("stopped at step 2; checkpoint saved. Resume with:")
            and line.endswith(f"train.resume=auto output.dir={tmp_path}")], out
    summary = out[out.index("dreamtune: lora on"):]
    for part in ("trainable parameters", "examples per epoch from 6 images", "5 steps, ~2 epochs",
                 "effective batch 2 (batch 2 x accumulation 1 x 1 processes), precision no", f"outputs -> {tmp_path}"):
        assert part in summary, f"startup summary lacks {part!r}:\n{summary}"
    assert "eta=" in err, "the progress bar shows no ETA"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-000002"]
    assert not (tmp_path / "final").exists()
    monkeypatch.undo()
    result = Trainer(config(tiny_model_dir, tmp_path, "train.max_steps=5", "train.resume=auto")).run()
    assert result.global_step == 5 and not result.interrupted
    assert (tmp_path / "final" / "sks_toy_lora.safetensors").is_file()


def test_half_written_checkpoint_is_ignored(tmp_path):
    good = tmp_path / "step-000002"
    good.mkdir()
    ckpt.write_state(good, {"global_step": 2, "epoch": 0, "batches_in_epoch": 2})
    (tmp_path / "step-000004.tmp").mkdir()  # killed while writing
    (tmp_path / "step-000006").mkdir()  # no state file: incomplete
    assert ckpt.resolve_resume("auto", tmp_path) == good
    ckpt.rotate(tmp_path, keep=3)
    assert not (tmp_path / "step-000004.tmp").exists()


def test_resume_from_a_non_checkpoint_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path), tmp_path / "checkpoints")


def test_nan_loss_stops_without_export(tiny_model_dir, tmp_path, monkeypatch):
    from dreamtune.training import objective

    # A NaN that keeps the graph, as a real one does: the step's backward and update run, then the loss is read.
    monkeypatch.setattr(objective, "per_sample_error", lambda pred, target, *rest: pred.float().flatten(1).mean(1) * float("nan"))
    with pytest.raises(TrainingDiverged, match="loss became nan at step 1.*learning_rate"):
        Trainer(config(tiny_model_dir, tmp_path, "train.max_steps=3")).run()
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize("save_every, max_steps", [(2, 3), (0, 2)], ids=["checkpoint", "export"])
def test_nan_weights_are_never_checkpointed_or_exported(tiny_model_dir, tmp_path, save_every, max_steps):
    """Weights that went inf with a finite loss (e.g. an inf update) stop the run before they are written."""
    cfg = config(tiny_model_dir, tmp_path, f"train.max_steps={max_steps}", f"train.save_every={save_every}")
    trainer = Trainer(cfg)
    after_step = trainer.method.after_step

    def poison_at_step_2(step):
        after_step(step)
        if step == 2:
            with torch.no_grad():
                trainer.params[0].view(-1)[0] = float("inf")

    trainer.method.after_step = poison_at_step_2
    with pytest.raises(TrainingDiverged, match="weights became NaN/inf at step 2; nothing was exported"):
        trainer.run()
    assert ckpt.list_checkpoints(tmp_path / "checkpoints") == [] and not (tmp_path / "final").exists()


def test_gradient_accumulation_equals_the_larger_batch_for_unet_and_text_encoder(tiny_model_dir, tmp_path):
    """batch 1 x accumulation 2 == batch 2 x accumulation 1: both models' adapters learn from every micro-batch."""
    from safetensors.torch import load_file

    weights = {}
    for name, batch, accumulation in (("batch", 2, 1), ("accumulated", 1, 2)):
        out = tmp_path / name
        # Adam turns a rounding-level difference in a near-zero gradient into a whole lr step; a larger eps keeps
        # each update proportional to its gradient, so the comparison measures the gradients.
        Trainer(config(tiny_model_dir, out, "train.max_steps=4", "train.save_every=0", "lora.train_text_encoder=true",
                       "train.adam_epsilon=1.0e-4", f"train.batch_size={batch}",
                       f"train.gradient_accumulation={accumulation}")).run()
        weights[name] = load_file(str(out / "diffusers" / "pytorch_lora_weights.safetensors"))
    batch, accumulated = weights["batch"], weights["accumulated"]
    assert batch.keys() == accumulated.keys()
    for part in ("unet.", "text_encoder."):
        trained = [k for k in batch if k.startswith(part) and "lora_B" in k]
        assert trained and all(batch[k].abs().max() > 1e-3 for k in trained), f"{part} adapters did not train"
    worst = max((batch[k] - accumulated[k]).abs().max().item() for k in batch)
    assert worst < 1e-5, f"accumulating 2 micro-batches differs from one batch of 2 by {worst}"


@pytest.mark.parametrize("override, message", [
    ("train.optimizer=adamw8bit", r"adamw8bit cannot run under DeepSpeed: .*Use train\.optimizer=adamw"),
    ("train.optimizer=lion8bit", r"lion8bit cannot run under DeepSpeed: .*Use train\.optimizer=adamw"),
    ("lora.train_text_encoder=true", r"lora\.train_text_encoder=true cannot run under DeepSpeed: .*"
                                     r"lora\.train_text_encoder=false, or launch without DeepSpeed"),
], ids=["adamw8bit", "lion8bit", "text_encoder"])
def test_deepspeed_launch_refuses_what_cannot_run_before_anything_loads(tmp_path, monkeypatch, override, message):
    """accelerate launch's DeepSpeed flag is checked before data or models load (deepspeed need not be installed)."""
    cfg = config(tmp_path / "no-model-here", tmp_path / "out", f"data.instance_dir={tmp_path / 'no-photos'}", override)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match=message):
        Trainer(cfg).run()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    with pytest.raises(DataSourceError):  # without DeepSpeed the same config gets as far as its (missing) data
        Trainer(cfg).run()


def test_eta_counts_the_validations_still_to_come():
    """1 s steps, 10 s validations every 4 of 12 steps: the ETA includes the validations not yet run."""
    from dreamtune.training.progress import Eta as _Eta

    now = {"t": 0.0}
    eta = _Eta(12, 4, clock=lambda: now["t"])
    remaining = {}
    for step in range(1, 9):
        now["t"] += 1.0
        eta.stepped()
        remaining[step] = eta.remaining(step)
        if step % 4 == 0:
            now["t"] += 10.0
            eta.validated(10.0)
    assert remaining[4] == pytest.approx(8), "before any validation ran, only the steps can be timed"
    assert remaining[5] == pytest.approx(7 + 2 * 10), "7 steps, the validation at step 8 and the final one"
    assert remaining[8] == pytest.approx(4 + 2 * 10), "step 8's own validation is still to come"


def test_validation_samples_the_ema_in_eval_mode_then_restores_training(tiny_model_dir, tmp_path, monkeypatch):
    """DreamBooth validation: EMA weights and eval mode while sampling; raw weights and train mode after."""
    from dreamtune.training import loop

    cfg = tiny_run_config(
        "tiny_dreambooth.yaml", tiny_model_dir, tmp_path, "train.max_steps=2", "train.save_every=0",
        "train.learning_rate=1.0e-3", "validation.every=1", "validation.prompts=[a photo of sks toy]",
        "validation.num_inference_steps=2", "validation.images_per_prompt=1", "dreambooth.prior_preservation=false",
        "dreambooth.ema_decay=0.5", "dreambooth.use_ema_for=ema",
    )
    trainer, sampled, validated = Trainer(cfg), [], []
    render_images = loop.render_images

    def spy_render(pipe, *args, **kwargs):
        ema = trainer.method.emas["unet"].shadow_params
        sampled.append({
            "training": [m.training for m in trainer.unwrapped().values()],
            "is_ema": all(torch.equal(p, e) for p, e in zip(pipe.unet.parameters(), ema)),
            "seed": kwargs["seed"],
        })
        return render_images(pipe, *args, **kwargs)

    validate = loop.Trainer.validate

    def spy_validate(self, step):
        raw = [p.detach().clone() for p in self.unwrapped()["unet"].parameters()]
        differs = any(not torch.equal(r, e) for r, e in zip(raw, self.method.emas["unet"].shadow_params))
        path = validate(self, step)
        validated.append({
            "ema_differs": differs,
            "restored": all(torch.equal(r, p) for r, p in zip(raw, self.unwrapped()["unet"].parameters())),
            "training": [m.training for m in self.unwrapped().values()],
        })
        return path

    monkeypatch.setattr(loop, "render_images", spy_render)
    monkeypatch.setattr(loop.Trainer, "validate", spy_validate)
    result = trainer.run()
    assert [p.name for p in result.samples] == ["step-000001.png", "step-000002.png"]
    assert len(sampled) == 2 and len(validated) == 2
    assert all(v["ema_differs"] for v in validated), "EMA equal to the raw weights: the check would be vacuous"
    assert [s["is_ema"] for s in sampled] == [True, True], "validation did not sample with the EMA weights"
    assert all(not any(s["training"]) for s in sampled), "trained models not in eval mode while sampling"
    assert all(v["restored"] for v in validated), "the raw weights were not swapped back after validation"
    assert all(all(v["training"]) for v in validated), "trained models not back in train mode after validation"
    assert len({s["seed"] for s in sampled}) == 1, "grids across steps must use the same seeds"


def test_bad_data_folder_fails_before_model_loads(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    cfg = config(tmp_path / "no-model-here", tmp_path / "out", f"data.instance_dir={tmp_path / 'photos'}")
    with pytest.raises(DataSourceError, match="no usable images") as info:
        Trainer(cfg).run()
    assert "broken.jpg" in str(info.value)


def test_missing_model_folder_is_named(tmp_path):
    cfg = config(tmp_path / "no-model-here", tmp_path / "out")
    with pytest.raises(ModelLoadError, match="no-model-here does not exist"):
        Trainer(cfg).run()


def test_unreachable_hub_id_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = config(Path("stable-diffusion-v1-5/stable-diffusion-v1-5"), tmp_path)
    cfg.model.pretrained = "someone/not-downloaded-model"
    with pytest.raises(ModelLoadError) as info:
        Trainer(cfg).run()
    message = str(info.value)
    assert "someone/not-downloaded-model" in message and "local diffusers folder" in message
    assert len(message.splitlines()) <= 3


def test_cli_prints_one_line_error_for_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: lora\nlora: {rnak: 4}\n")
    run = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "--config", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "did you mean lora.rank?" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
def test_trackers_log_expected_keys_at_global_steps(tiny_model_dir, tmp_path, monkeypatch):
    """tensorboard events and an offline wandb run, with loss/lr/throughput at every global step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config(tiny_model_dir, tmp_path, "train.max_steps=4", "train.save_every=0", "logging.every=1",
                 "logging.report_to=[tensorboard, wandb]", "validation.prompts=[a photo of sks toy]",
                 "validation.every=2", "validation.num_inference_steps=2", "validation.images_per_prompt=1",
                 "train.gradient_accumulation=2", "train.batch_size=1")
    Trainer(cfg).run()
    # The run's own writer; accelerate writes the config's hparams with another, into a subfolder.
    events, = (tmp_path / "logs" / cfg.logging.project).glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"loss", "lr/unet", "grad_norm", "steps_per_s", "samples_per_s", "peak_memory_gb"} <= tags
    assert [e.step for e in accumulator.Scalars("loss")] == [1, 2, 3, 4], "global steps, not micro-steps"
    assert [e.step for e in accumulator.Images("validation")] == [2, 4]
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_checkpoint_refused_when_disk_is_full(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 1024))
    with pytest.raises(ckpt.InsufficientDiskError, match=r"needs about 2\.0 MiB, 0\.0 MiB free"):
        ckpt.check_free_disk(tmp_path, 2 << 20)


def test_sample_streams_never_collide_across_steps_or_large_batches():
    """Step 0's sample 4096 and step 1's sample 0 (the old arithmetic seeds collided there) draw apart."""
    from dreamtune.training.objective import sample_generators

    first = sample_generators(7, 0, [4096, 0])
    second = sample_generators(7, 1, [0])
    again = sample_generators(7, 0, [4096])
    draw = [torch.randn(4, generator=g) for g in (*first, *second, *again)]
    assert not torch.equal(draw[0], draw[2]) and not torch.equal(draw[0], draw[1])
    assert torch.equal(draw[0], draw[3])  # same (seed, step, place): same stream
