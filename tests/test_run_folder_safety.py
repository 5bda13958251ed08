"""A run folder belongs to one run; a full disk, a second Ctrl-C or a damaged file never costs work or gives a
traceback (issue #29): ownership and lock, disk-full and unwritable outputs, interrupts, damaged weight files."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamtune.cli import main
from dreamtune.training import checkpoints as ckpt
from dreamtune.training.interrupts import EXIT_INTERRUPTED, RunStopped
from dreamtune.training.loop import Trainer
from dreamtune.training.ownership import OutputNotWritable, RunFolderTaken
from dreamtune.training.saving import RESCUE_DIR_ENV, SaveFailed

from .conftest import REPO_ROOT, tiny_run_config


def lora(model_dir: Path, out: Path, *overrides: str):
    return tiny_run_config("tiny_lora.yaml", model_dir, out, "validation.prompts=[]", "train.save_every=0",
                           *overrides)


def cli_train(model_dir: Path, out: Path, *overrides: str) -> int:
    """`dreamtune train` in this process, as the tiny_run_config helper sets it up."""
    return main(["train", "--config", str(REPO_ROOT / "configs" / "tiny_lora.yaml"), f"model.pretrained={model_dir}",
                 f"output.dir={out}", f"data.instance_dir={REPO_ROOT / 'examples' / 'sks_toy'}", "data.resolution=32",
                 "logging.report_to=[]", "validation.prompts=[]", "train.save_every=0", *overrides])


def no_model_load(monkeypatch) -> None:
    """Fail the test if the base model starts loading: the refusal must come first."""
    from dreamtune.training import loop

    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the refusal")

    monkeypatch.setattr(loop, "load_base_model", refuse)


def enospc_under(monkeypatch, folder: Path, *targets: tuple[object, str]) -> None:
    """Make each (module, name) writer raise ENOSPC for paths under ``folder`` (the output disk is full)."""
    for module, name in targets:
        original = getattr(module, name)

        def full(tensors, path, *args, _original=original, **kwargs):
            if str(path).startswith(str(folder)):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return _original(tensors, path, *args, **kwargs)

        monkeypatch.setattr(module, name, full)


# -- 1. a run folder is owned ---------------------------------------------------------------------------


def test_another_runs_folder_is_refused_and_its_checkpoints_are_never_resumed_or_rotated(tiny_model_dir, tmp_path,
                                                                                         monkeypatch):
    """Run A (seed 1) leaves checkpoints; run B (seed 7) into the same folder is refused before the model loads,
    with or without resume; A's checkpoints stay. A plain rerun of A is refused too (it would replace final/)."""
    out = tmp_path / "run"
    Trainer(lora(tiny_model_dir, out, "train.seed=1", "train.max_steps=4", "train.save_every=2")).run()
    a_checkpoints = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]
    assert a_checkpoints == ["step-000002"] and (out / "final").is_dir()
    with monkeypatch.context() as patch:
        no_model_load(patch)
        for resume in ([], ["train.resume=auto"]):
            with pytest.raises(RunFolderTaken, match=r"holds another run .*train\.seed \(1 there, 7 now\)") as info:
                Trainer(lora(tiny_model_dir, out, "train.seed=7", "train.learning_rate=3e-4", *resume)).run()
            assert "output.overwrite=true" in str(info.value) and "train.resume=auto" in str(info.value)
        with pytest.raises(RunFolderTaken, match="already holds this run's results"):
            Trainer(lora(tiny_model_dir, out, "train.seed=1", "train.max_steps=4")).run()
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == a_checkpoints
    assert "seed: 1" in (out / "config.yaml").read_text()

    # output.overwrite replaces A: its checkpoints go, config.yaml and final/ are B's.
    Trainer(lora(tiny_model_dir, out, "train.seed=7", "train.max_steps=2", "output.overwrite=true")).run()
    assert ckpt.list_checkpoints(out / "checkpoints") == []
    assert "seed: 7" in (out / "config.yaml").read_text()


def test_resume_and_rotation_only_touch_this_runs_checkpoints(tmp_path):
    """A foreign checkpoint (another fingerprint) is refused by an explicit resume, skipped by auto, kept by rotation."""
    folder = tmp_path / "checkpoints"
    for step, owner in ((2, "mine"), (4, "mine"), (8, "theirs"), (10, "theirs")):
        path = folder / ckpt.checkpoint_name(step)
        path.mkdir(parents=True)
        ckpt.write_state(path, {"global_step": step, "fingerprint": owner})
    assert ckpt.resolve_resume("auto", folder, "mine").name == "step-000004"
    with pytest.raises(ckpt.ForeignCheckpoint, match="step-000010 was written by another run"):
        ckpt.resolve_resume(str(folder / "step-000010"), folder, "mine")
    ckpt.rotate(folder, 1, "mine")
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["step-000004", "step-000008", "step-000010"]


def test_a_live_runs_lock_refuses_a_second_run_and_a_stale_one_is_replaced(tiny_model_dir, tmp_path, monkeypatch):
    import socket

    out = tmp_path / "run"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "run.lock").write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "since": "now"}))
        with monkeypatch.context() as patch:
            no_model_load(patch)
            with pytest.raises(RunFolderTaken, match=rf"in use by a live run \(pid {live.pid} on"):
                Trainer(lora(tiny_model_dir, out, "train.max_steps=1")).run()
    finally:
        live.kill()
        live.wait()
    # The holder is gone: its lock is stale, the run takes it over and removes it at the end.
    result = Trainer(lora(tiny_model_dir, out, "train.max_steps=1")).run()
    assert result.global_step == 1 and not (out / "run.lock").exists()
    assert json.loads((out / "run.json").read_text())["fingerprint"]


# -- 3/7. disk full, unwritable output -----------------------------------------------------------------------


def test_unwritable_output_is_refused_in_one_line_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch,
                                                                           capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    no_model_load(monkeypatch)
    with pytest.raises(OutputNotWritable, match=rf"output.dir {blocker}/run is not writable"):
        Trainer(lora(tiny_model_dir, blocker / "run", "train.max_steps=1")).run()
    assert cli_train(tiny_model_dir, blocker / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output.dir") and "Traceback" not in err


def exported_bytes(run: Path) -> dict[str, bytes]:
    """Every exported file (final/, diffusers/, variants/) by its path in the run folder."""
    return {p.relative_to(run).as_posix(): p.read_bytes() for folder in ("final", "diffusers", "variants")
            for p in sorted((run / folder).rglob("*")) if p.is_file()}


def test_full_disk_at_export_keeps_the_previous_final_and_rescues_the_weights(tiny_model_dir, tmp_path, monkeypatch):
    """ENOSPC while exporting (save_every 0: nothing checkpointed yet): final/ is the previous one, untouched and
    whole; the weights are saved as a resumable checkpoint in the rescue folder the message names."""
    from dreamtune.weights import safetensors_io

    out, rescue = tmp_path / "run", tmp_path / "rescue"
    Trainer(lora(tiny_model_dir, out, "train.max_steps=2")).run()
    before = exported_bytes(out)
    monkeypatch.setenv(RESCUE_DIR_ENV, str(rescue))
    with monkeypatch.context() as patch:
        enospc_under(patch, out, (safetensors_io, "save_file"), (ckpt, "save_file"))
        with pytest.raises(SaveFailed, match=r"export to .*final failed \(No space left on device\); the previous "
                                             r"final/ is kept\. The trained weights are saved") as info:
            Trainer(lora(tiny_model_dir, out, "train.max_steps=3", "train.resume=auto")).run()
    assert exported_bytes(out) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [], "a temp export folder was left"
    saved = next(rescue.glob("dreamtune-rescue-*/step-000003"))
    assert str(saved) in str(info.value) and json.loads((saved / "trainer_state.json").read_text())["global_step"] == 3

    result = Trainer(lora(tiny_model_dir, out, "train.max_steps=3", f"train.resume={saved}")).run()
    assert result.global_step == 3 and result.exported
    assert exported_bytes(out)["diffusers/pytorch_lora_weights.safetensors"] != before[
        "diffusers/pytorch_lora_weights.safetensors"]


def test_full_disk_during_a_dreambooth_export_leaves_no_half_diffusers_folder(tiny_model_dir, tmp_path, monkeypatch):
    import safetensors.torch

    from dreamtune.weights import safetensors_io

    out = tmp_path / "run"
    monkeypatch.setenv(RESCUE_DIR_ENV, str(tmp_path / "rescue"))
    enospc_under(monkeypatch, out, (safetensors.torch, "save_file"), (safetensors_io, "save_file"),
                 (ckpt, "save_file"))
    cfg = tiny_run_config("tiny_dreambooth.yaml", tiny_model_dir, out, "train.max_steps=1", "train.save_every=0",
                          "validation.prompts=[]", "dreambooth.prior_preservation=false")
    with pytest.raises(SaveFailed, match="no final/ was written"):
        Trainer(cfg).run()
    assert not (out / "final").exists() and not (out / "diffusers").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert list((tmp_path / "rescue").glob("dreamtune-rescue-*/step-000001/trainer_state.json"))


def test_a_refused_periodic_checkpoint_warns_and_training_goes_on(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    original = ckpt.save_trainable
    calls = {"n": 0}

    def second_fails(tensors, folder):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder))
        return original(tensors, folder)

    monkeypatch.setattr(ckpt, "save_trainable", second_fails)
    result = Trainer(lora(tiny_model_dir, out, "train.max_steps=4", "train.save_every=1",
                          "train.checkpoints_total_limit=5")).run()
    assert result.global_step == 4 and result.exported
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-000001", "step-000003"]
    assert not list((out / "checkpoints").glob("*.tmp"))
    err = capsys.readouterr().err
    assert "checkpoint at step 2 could not be written (No space left on device); the previous one, step-000001, " \
           "is kept" in err


def test_free_disk_precheck_at_a_stop_rescues_and_exits_with_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The stop checkpoint meets a full output disk: the weights go to the rescue folder; no traceback."""
    import shutil
    from collections import namedtuple

    out, rescue = tmp_path / "run", tmp_path / "rescue"
    usage, real = namedtuple("usage", "total used free"), shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: usage(10, 10, 1024) if str(p).startswith(str(out)) else real(p))
    monkeypatch.setenv(RESCUE_DIR_ENV, str(rescue))
    signal_during_step(monkeypatch, 2)
    assert cli_train(tiny_model_dir, out, "train.max_steps=5") == EXIT_INTERRUPTED
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert list(rescue.glob("dreamtune-rescue-*/step-000002/trainer_state.json"))
    assert ckpt.list_checkpoints(out / "checkpoints") == []


# -- 5. interrupts ----------------------------------------------------------------------------------------------


def signal_during_step(monkeypatch, step: int, times: int = 1) -> None:
    from dreamtune.training import loop

    original, calls = loop.Trainer._train_step, {"n": 0}

    def step_then_signal(self, batch, micro_step):
        calls["n"] += 1
        if calls["n"] == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch, micro_step)

    monkeypatch.setattr(loop.Trainer, "_train_step", step_then_signal)


def signal_during_first_image(monkeypatch, times: int) -> dict:
    """Ctrl-C ``times`` times while the first validation image renders; counts the images rendered."""
    from dreamtune.training import loop

    build, seen = loop.build_pipeline, {"images": 0}

    def counting(*args, **kwargs):
        pipe = build(*args, **kwargs)

        class Pipe:
            def __call__(self, *a, **k):
                seen["images"] += 1
                if seen["images"] == 1:
                    for _ in range(times):
                        os.kill(os.getpid(), signal.SIGINT)
                return pipe(*a, **k)

        return Pipe()

    monkeypatch.setattr(loop, "build_pipeline", counting)
    return seen


VALIDATE = ("validation.prompts=[a photo of sks toy, a toy]", "validation.images_per_prompt=2",
            "validation.every=1", "validation.num_inference_steps=1")


def test_ctrl_c_during_validation_stops_at_the_next_image_checkpoints_and_exits_3(tiny_model_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    out = tmp_path / "run"
    seen = signal_during_first_image(monkeypatch, times=1)
    assert cli_train(tiny_model_dir, out, "train.max_steps=4", *VALIDATE) == EXIT_INTERRUPTED
    assert seen["images"] == 1, "validation went on after the Ctrl-C"
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-000001"]
    assert not (out / "final").exists() and not list((out / "samples").glob("step-000001.png"))
    assert "stopped at step 1; checkpoint saved" in capsys.readouterr().out


def test_a_second_ctrl_c_during_validation_exits_at_once_after_a_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = signal_during_first_image(monkeypatch, times=2)
    with pytest.raises(RunStopped, match="stopped at once at step 1; checkpoint saved") as info:
        Trainer(lora(tiny_model_dir, out, "train.max_steps=4", *VALIDATE)).run()
    assert info.value.exit_code == EXIT_INTERRUPTED and seen["images"] == 1
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-000001"]
    assert not (out / "run.lock").exists()


def test_a_second_ctrl_c_during_a_step_exits_without_a_torn_checkpoint(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    signal_during_step(monkeypatch, 2, times=2)
    assert cli_train(tiny_model_dir, out, "train.max_steps=5") == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "error: stopped at once during a training step; no checkpoint was saved yet" in err
    assert "Traceback" not in err and ckpt.list_checkpoints(out / "checkpoints") == []


# -- 6/8. damaged weight files, NaN coefficients, output == input -------------------------------------------------


def damaged_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    good = folder / "good.safetensors"
    save_file({"w": torch.ones(64)}, str(good))
    files = {
        "empty": b"",
        "text": b"this is a text file, not weights\n",
        "huge-header": struct.pack("<Q", 10**12) + b"{}",
        "max-header": struct.pack("<Q", 2**63 - 1) + b"{}",
        "truncated": good.read_bytes()[:-40],
    }
    paths = {}
    for name, blob in files.items():
        paths[name] = folder / f"{name}.safetensors"
        paths[name].write_bytes(blob)
    return paths


@pytest.mark.parametrize("command", ["inspect", "convert", "blend", "merge-lora"])
def test_every_weight_command_refuses_damaged_files_in_one_line(tmp_path, capsys, command):
    def unraisable(hook_args):
        raise AssertionError(f"unraisable: {hook_args.exc_value}")

    for kind, path in damaged_files(tmp_path).items():
        args = {"inspect": ["inspect", str(path)],
                "convert": ["convert", str(path), str(tmp_path / "out.safetensors")],
                "blend": ["blend", str(path), str(tmp_path / "good.safetensors"), "--out", str(tmp_path / "b.safetensors")],
                "merge-lora": ["merge-lora", str(path), "--lora", str(tmp_path / "good.safetensors"),
                               "--out", str(tmp_path / "m.safetensors")]}[command]
        old_hook, sys.unraisablehook = sys.unraisablehook, unraisable
        try:
            code = main(args)
            import gc

            gc.collect()  # a reader's __del__ must not close its descriptor twice
        finally:
            sys.unraisablehook = old_hook
        err = capsys.readouterr().err
        assert code == 2, (kind, err)
        assert err.startswith(f"error: {path} is not a readable .safetensors file") and err.count("\n") == 1, (kind, err)


@pytest.mark.parametrize("flags", [["--alpha", "nan"], ["--alpha", "inf"], ["--weights", "1,nan"]])
def test_blend_refuses_non_finite_coefficients(tmp_path, capsys, flags):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for path in (a, b):
        save_file({"model.diffusion_model.w": torch.ones(4)}, str(path))
    assert main(["blend", str(a), str(b), "--out", str(tmp_path / "out.safetensors"), *flags]) == 2
    assert "must be finite numbers" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_onto_its_input_is_refused_unless_in_place(tmp_path, capsys):
    path = tmp_path / "emb.safetensors"
    save_file({"<sks>": torch.ones(2, 32)}, str(path))
    original = path.read_bytes()
    assert main(["convert", str(path), str(path), "--dtype", "fp16"]) == 2
    assert "pass --in-place" in capsys.readouterr().err and path.read_bytes() == original
    assert main(["convert", str(path), str(tmp_path / "." / "emb.safetensors"), "--dtype", "fp16", "--in-place"]) == 0
    assert {t.dtype for t in load_file(str(path)).values()} == {torch.float16}


def test_converting_a_single_file_to_diffusers_in_place_is_refused(tiny_model_dir, tmp_path, capsys):
    single = tmp_path / "model.safetensors"
    assert main(["convert", str(tiny_model_dir), str(single), "--no-hash"]) == 0
    size = single.stat().st_size
    capsys.readouterr()
    assert main(["convert", str(single), str(single), "--to", "diffusers", "--in-place",
                 "--config-dir", str(tiny_model_dir)]) == 2
    assert "changes its layout" in capsys.readouterr().err
    assert single.is_file() and single.stat().st_size == size


# -- 9. messages that misled -------------------------------------------------------------------------------------------


def test_convert_without_config_dir_names_the_flag(tiny_model_dir, tmp_path, capsys):
    single = tmp_path / "model.safetensors"
    assert main(["convert", str(tiny_model_dir), str(single), "--no-hash"]) == 0
    capsys.readouterr()
    assert main(["convert", str(single), str(tmp_path / "folder")]) == 2  # the tiny model is not SD 1.5-shaped
    assert "--config-dir" in capsys.readouterr().err


def test_an_empty_caption_file_is_named_as_empty(tmp_path):
    from dreamtune.data.dataset import build_dataset

    from .test_data_helpers import cfg, write_image

    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a photo of sks")
    write_image(tmp_path / "empty.png")
    (tmp_path / "empty.txt").write_text("  \n")
    report = build_dataset(cfg(instance_dir=str(tmp_path)), seed=0).report
    reasons = dict(report.skipped)
    assert "write a caption into empty.txt (it is empty)" in reasons[str(tmp_path / "empty.png")]


def test_a_mistyped_relative_model_path_is_not_sent_to_the_hub(tiny_model_dir, tmp_path, monkeypatch):
    from dreamtune.models.loading import ModelLoadError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    cfg = lora(tiny_model_dir, tmp_path / "out", "train.max_steps=1")
    cfg.model.pretrained = "models/tiny-sd"
    with pytest.raises(ModelLoadError, match=r"models/tiny-sd does not exist: no such folder or file") as info:
        Trainer(cfg).run()
    assert "hf download" not in str(info.value)


def test_the_fingerprint_leaves_keys_at_their_default_out(tiny_model_dir, tmp_path):
    """So a release that adds a key (at the default that keeps old behaviour) can still resume older runs."""
    from dreamtune.training.ownership import fingerprint_fields, run_fingerprint

    cfg = tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path)
    fields = fingerprint_fields(cfg)
    assert "train.loss_type" not in fields and "data.masked_loss" not in fields and "model.clip_skip" not in fields
    assert fields["trainer"] == "lora" and fields["data.resolution"] == 32
    spelled_out = tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, "train.loss_type=l2", "model.clip_skip=1")
    assert run_fingerprint(spelled_out) == run_fingerprint(cfg)
    assert run_fingerprint(tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, "train.loss_type=l1")) != \
        run_fingerprint(cfg)
