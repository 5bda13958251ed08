"""train.initial_step: start a run as if it had already made N steps (kohya's --initial_step).

With a method's ``init_from`` (an adapter or embedding file) this continues from an exported file where
a resume would continue from a checkpoint: the same data order, noise, timesteps and learning rate from
step N on. Only the optimizer's state (Adam's moments) cannot come from a weights file.
"""

from __future__ import annotations

from ..errors import ConfigError


def data_position(step: int, accumulation: int, batches_per_epoch: int) -> tuple[int, int]:
    """``(epoch, batches already seen in it)`` after ``step`` optimizer steps, per process."""
    if not batches_per_epoch:
        raise ConfigError("train.initial_step needs a dataset of known size; a streamed dataset cannot be "
                          "fast-forwarded (start from train.initial_step=0, or resume from a checkpoint)")
    return divmod(step * accumulation, batches_per_epoch)


def advance_schedule(lr_scheduler, steps: int, num_processes: int) -> None:
    """Step the learning-rate schedule as ``steps`` training steps would (accelerate steps it once per process)."""
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)
    for _ in range(steps * num_processes):
        inner.step()


def start_at(trainer, step: int) -> tuple[int, int, int]:
    """``(global_step, epoch, batches to skip)`` for a run starting at ``step``, its schedule advanced to match."""
    t = trainer.cfg.train
    if step >= t.max_steps:
        raise ConfigError(f"train.initial_step={step} leaves nothing to train: train.max_steps is {t.max_steps}; "
                          "set train.max_steps to the step the run should end at")
    epoch, skip = data_position(step, t.gradient_accumulation, trainer.loader.batches_per_epoch())
    advance_schedule(trainer.lr_scheduler, step, trainer.accelerator.num_processes)
    return step, epoch, skip
