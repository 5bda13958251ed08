"""The shared loop's runtime: exact resume, clean interruption, NaN guard, multi-process launch, early errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreamtune.data.sources import DataSourceError
from dreamtune.trainers import checkpoints as ckpt
from dreamtune.trainers.config import load_config
from dreamtune.trainers.loop import Trainer, TrainingDiverged
from dreamtune.trainers.models import ModelLoadError

from .conftest import REPO_ROOT, tiny_run_config


def config(model_dir: Path, out: Path, *overrides: str):
    return tiny_run_config(
        "quickstart_lora.yaml",
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

    from dreamtune.trainers import loop

    original = loop.Trainer._train_step
    calls = {"n": 0}

    def step_then_signal(self, batch, micro_step):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, micro_step)

    monkeypatch.setattr(loop.Trainer, "_train_step", step_then_signal)


def test_resume_matches_a_straight_run(tiny_model_dir, tmp_path, monkeypatch):
    """6 steps straight == stop at 2, resume, stop at 4, resume to 6 (bitwise on the CPU)."""
    from safetensors.torch import load_file

    Trainer(config(tiny_model_dir, tmp_path / "straight", "train.max_steps=6", "train.save_every=0")).run()
    out = tmp_path / "resumed"
    steps = []
    for stop_after in (2, 2, None):
        with monkeypatch.context() as patch:
            if stop_after:
                interrupt_at(patch, stop_after)
            cfg = config(tiny_model_dir, out, "train.max_steps=6", "train.save_every=0", "train.resume=auto",
                         "train.checkpoints_total_limit=5")
            steps.append(Trainer(cfg).run().global_step)
    assert steps == [2, 4, 6]
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-000002", "step-000004"]
    exported = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    expected = load_file(str(tmp_path / "straight" / "final" / "pytorch_lora_weights.safetensors"))
    assert exported.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(exported[k], expected[k])] == []


def test_stop_request_checkpoints_and_resume_completes(tiny_model_dir, tmp_path, monkeypatch):
    """A SIGTERM mid-run finishes the step, writes a checkpoint, exports nothing; resume finishes."""
    interrupt_at(monkeypatch, 2)
    cfg = config(tiny_model_dir, tmp_path, "train.max_steps=5", "train.save_every=0")
    result = Trainer(cfg).run()
    assert result.interrupted and result.global_step == 2
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
    from dreamtune.trainers import loop

    monkeypatch.setattr(loop, "per_sample_mse", lambda pred, target: torch.full((pred.shape[0],), float("nan")))
    with pytest.raises(TrainingDiverged, match="loss became nan at step 1.*learning_rate"):
        Trainer(config(tiny_model_dir, tmp_path, "train.max_steps=3")).run()
    assert not (tmp_path / "final").exists()


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
def test_two_processes_match_one_process_at_the_same_global_batch(tiny_model_dir, tmp_path):
    """accelerate launch with 2 gloo processes x batch 1 == 1 process x batch 2; files written once."""
    from safetensors.torch import load_file

    common = [
        f"model.pretrained={tiny_model_dir}", f"data.instance_dir={REPO_ROOT / 'examples' / 'sks_toy'}",
        "data.resolution=32", "train.max_steps=4", "train.save_every=2", "validation.every=0",
        "validation.num_inference_steps=2", "validation.images_per_prompt=1", "train.max_grad_norm=0",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO_ROOT / "train.py"), "--config", str(REPO_ROOT / "configs" / "quickstart_lora.yaml"),
        f"output.dir={tmp_path / 'two'}", "train.batch_size=1", *common,
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    two = tmp_path / "two"
    assert run.stdout.count("done: 4 steps") == 1
    assert "batch 1 x accumulation 1 x 2 processes" in run.stdout
    checkpoint = two / "checkpoints" / "step-000002"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert sorted(p.name for p in (two / "final").iterdir()) == [
        "pytorch_lora_weights.safetensors", "sks_toy_lora.safetensors"]
    assert len(list((two / "samples").glob("*.png"))) == 1

    cfg = load_config(REPO_ROOT / "configs" / "quickstart_lora.yaml",
                      [f"output.dir={tmp_path / 'one'}", "train.batch_size=2", "logging.report_to=[]", *common])
    Trainer(cfg).run()
    one = load_file(str(tmp_path / "one" / "final" / "pytorch_lora_weights.safetensors"))
    both = load_file(str(two / "final" / "pytorch_lora_weights.safetensors"))
    assert one.keys() == both.keys()
    worst = max((one[k] - both[k]).abs().max().item() for k in one)
    assert worst < 1e-5, f"two-process result differs from one process by {worst}"


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
    events = sorted((tmp_path / "logs").rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_size)[-1]
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
