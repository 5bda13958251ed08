"""Writing a run's checkpoints and final/ so that a full disk or a signal never costs the trained weights.

Checkpoints go through a .tmp folder renamed at the end; an export is written into a staging folder inside
the run and its final/, diffusers/ and variants/ swapped in only once all of it is written, so the previous
export stays until a complete new one exists. When a write fails, the
weights (still in memory) are saved as a checkpoint in the run folder or, failing that, in a fallback folder
the message names.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import DreamtuneError
from . import checkpoints as ckpt
from .model_card import write_model_card
from .optim import optimizer_eval_mode
from .run_folder import RunFolder

#: Environment variable naming where weights go when the output folder cannot take them.
RESCUE_DIR_ENV = "DREAMTUNE_RESCUE_DIR"


class SaveFailed(DreamtuneError, OSError):
    """A checkpoint or export could not be written; the message says where the weights were saved instead."""


def _reason(err: BaseException) -> str:
    return (err.strerror if isinstance(err, OSError) and err.strerror else None) or str(err) or type(err).__name__


def rescue_dir(trainer) -> Path:
    """Where weights go when the output folder cannot take them: $DREAMTUNE_RESCUE_DIR or the temp folder."""
    base = Path(os.environ.get(RESCUE_DIR_ENV) or tempfile.gettempdir())
    return base / f"dreamtune-rescue-{trainer.cfg.output.name}-{trainer.ownership.fingerprint[:8]}"


def save_checkpoint(trainer, step: int, epoch: int, batches_in_epoch: int, folder: Path | None = None) -> Path:
    """Write checkpoints/step-N (or ``folder``) via a .tmp folder renamed at the end, so a kill or a full disk
    never leaves a torn one; a second Ctrl-C waits for the write to finish."""
    trainer._check_finite_weights(step)
    acc, run = trainer.accelerator, trainer.run_folder
    final = folder or run.checkpoint(step)
    tmp = final.with_name(final.name + ".tmp")
    with trainer.stop.shielded():
        try:
            if acc.is_main_process:
                tmp.mkdir(parents=True, exist_ok=True)
                # Weights plus two Adam moments, with a margin for RNG/scheduler files.
                ckpt.check_free_disk(tmp, int(sum(p.numel() * 4 for p in trainer.params) * 3.2) + (1 << 20))
            acc.wait_for_everyone()
            acc.save_state(str(tmp))
            acc.wait_for_everyone()  # every process has written its RNG state before the folder is renamed
            if acc.is_main_process:
                tensors = {n: trainer.method.trainable_state_dict(n, m) for n, m in trainer.unwrapped().items()}
                ckpt.save_trainable(tensors, tmp)
                if trainer.cfg.export.every_save:
                    export_into(trainer, RunFolder(tmp / EXPORT_SUBFOLDER), step)
                state = {"global_step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
                         "fingerprint": trainer.ownership.fingerprint}
                held_out = getattr(trainer, "validation_loss", None)
                if held_out is not None and step in held_out.values:
                    state["val_loss"] = held_out.values[step]
                ckpt.write_state(tmp, state)
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                if folder is None:
                    ckpt.rotate(run.checkpoints, trainer.cfg.train.checkpoints_total_limit,
                                trainer.ownership.fingerprint, trainer.cfg.validation.keep_best)
        except OSError:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    acc.wait_for_everyone()
    return final


def checkpoint_or_warn(trainer, step: int, epoch: int, batches_in_epoch: int) -> Path | None:
    """A periodic checkpoint; when the disk refuses it, say so and train on (the next one retries)."""
    try:
        return save_checkpoint(trainer, step, epoch, batches_in_epoch)
    except OSError as err:
        kept = ckpt.own_checkpoints(trainer.run_folder.checkpoints, trainer.ownership.fingerprint)
        trainer.accelerator.print(
            f"warning: checkpoint at step {step} could not be written ({_reason(err)}); "
            f"{'the previous one, ' + kept[-1].name + ', is kept' if kept else 'no earlier checkpoint exists'}. "
            "Training goes on with the weights in memory; the next checkpoint tries again.", file=sys.stderr)
        return None


def rescue(trainer, step: int, epoch: int, batches_in_epoch: int) -> tuple[Path | None, list[str]]:
    """Save a resumable checkpoint of the weights in memory: in the run folder, else in the rescue folder.
    Returns the folder written (None if neither could take it) and why each attempt failed."""
    failures = []
    for folder in (trainer.run_folder.checkpoint(step), rescue_dir(trainer) / ckpt.checkpoint_name(step)):
        try:
            return save_checkpoint(trainer, step, epoch, batches_in_epoch, folder), failures
        except OSError as err:
            failures.append(f"{folder}: {_reason(err)}")
    return None, failures


def rescued_text(saved: Path | None, failures: list[str]) -> str:
    """The part of a message that says where the weights went, and how to go on from there."""
    if saved is None:
        return (f"The trained weights could not be saved anywhere ({'; '.join(failures)}). Free disk space or set "
                f"{RESCUE_DIR_ENV} to a folder on another disk before the next run.")
    return (f"The trained weights are saved as a checkpoint in {saved}; free disk space, then run again with "
            f"train.resume={'auto' if saved.parent.name == 'checkpoints' else saved} to finish.")


def checkpoint_on_stop(trainer, step: int, epoch: int, batches_in_epoch: int) -> Path:
    """The checkpoint of a stopped run; when the run folder refuses it, the rescue folder; else one clear error."""
    try:
        return save_checkpoint(trainer, step, epoch, batches_in_epoch)
    except OSError as err:
        saved, failures = rescue(trainer, step, epoch, batches_in_epoch)
        if saved is None:
            raise SaveFailed(f"stopped at step {step}, but no checkpoint could be written "
                             f"({_reason(err)}). {rescued_text(saved, failures)}") from err
        return saved


#: Where export.every_save puts a checkpoint's export files (final/, diffusers/, variants/ inside it).
EXPORT_SUBFOLDER = "export"


def export_into(trainer, out: RunFolder, step: int) -> list[Path]:
    """The method's export files of the weights in memory, written into ``out`` (main process)."""
    exporter = trainer.method.exporter_class(trainer.cfg, trainer.method)
    modules = trainer.unwrapped()
    with optimizer_eval_mode(trainer.optimizer), trainer.method.weights("export", modules):
        return exporter.write(out, modules, step)


#: The export folders of a run, published together once every file of the export is written.
EXPORT_FOLDERS = ("final", "diffusers", "variants")


def publish(staging: RunFolder, run: RunFolder) -> None:
    """Swap each staged export folder into the run, replacing the previous one whole; a folder the new export
    does not write is removed, so final/, diffusers/ and variants/ always come from one export."""
    for name in EXPORT_FOLDERS:
        new, current = getattr(staging, name), getattr(run, name)
        old = current.with_name(f".{name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if current.exists():
            os.replace(current, old)
        if new.exists():
            os.replace(new, current)
        shutil.rmtree(old, ignore_errors=True)


def export_final(trainer, step: int, epoch: int, batches_in_epoch: int) -> tuple[list[Path], Path | None]:
    """The method's files (final/, diffusers/, variants/, written whole or not at all) and the model card;
    returns the files and the one to give a UI. On a failed write, the previous export is kept, the weights
    are rescued and a SaveFailed names where they are."""
    acc, run = trainer.accelerator, trainer.run_folder
    failure = None
    exported: list[Path] = []
    ui_file = None
    if acc.is_main_process:
        exporter = trainer.method.exporter_class(trainer.cfg, trainer.method)
        staging = None
        try:
            run.root.mkdir(parents=True, exist_ok=True)
            staging = RunFolder(tempfile.mkdtemp(prefix=".export-", suffix=".tmp", dir=run.root))
            staged = export_into(trainer, staging, step)
            publish(staging, run)
            exported = [run.root / Path(p).relative_to(staging.root) for p in staged]
            ui_file = exporter.ui_file(exported)
            write_model_card(run, trainer.cfg, exporter, exported, step)
        except OSError as err:
            failure = _reason(err)
        finally:
            if staging is not None:
                shutil.rmtree(staging.root, ignore_errors=True)
    # No collective here: a reduce just before the process group is torn down can deadlock gloo's teardown,
    # so several processes keep the barrier alone and the main process rescues what it holds.
    acc.wait_for_everyone()
    if failure is None:
        return exported, ui_file
    kept = "the previous final/ is kept" if run.final.exists() else "no final/ was written"
    if acc.num_processes == 1:
        saved, failures = rescue(trainer, step, epoch, batches_in_epoch)
        raise SaveFailed(f"export to {run.final} failed ({failure}); {kept}. {rescued_text(saved, failures)}")
    folder = rescue_dir(trainer) / f"{ckpt.checkpoint_name(step)}-weights"
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.save_trainable({n: trainer.method.trainable_state_dict(n, m) for n, m in trainer.unwrapped().items()}, folder)
    raise SaveFailed(f"export to {run.final} failed ({failure}); {kept}. The trained tensors are saved in {folder} "
                     "(without optimizer state: this multi-process run cannot resume from them)")
