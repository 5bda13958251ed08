"""Ctrl-C and SIGTERM during a run: the first asks for a clean stop (finish the step or the image, checkpoint,
exit with EXIT_INTERRUPTED); a second one exits at once, after a checkpoint where one is safe."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Iterator

from ..errors import DreamtuneError

#: The exit status of a run stopped by a signal: not finished, resumable with train.resume=auto.
EXIT_INTERRUPTED = 3


class ForcedStop(KeyboardInterrupt):
    """A second Ctrl-C/SIGTERM: raised wherever the run is (a KeyboardInterrupt, so no `except Exception` eats it)."""


class RunStopped(DreamtuneError):
    """A run ended by a second signal before it finished; the message says what was saved."""

    exit_code = EXIT_INTERRUPTED


class StopFlag:
    """SIGINT/SIGTERM: the first sets ``requested`` (the loop stops at the next safe point); the second raises
    ForcedStop, or, inside ``shielded()`` (a checkpoint being written), right after that block."""

    def __init__(self) -> None:
        self.requested = False
        self.forced = False
        self._shield = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.requested = True
            print("\nstopping at the next safe point and saving a checkpoint; press Ctrl-C again to exit at once",
                  file=sys.stderr, flush=True)
            return
        self.forced = True
        if not self._shield:
            raise ForcedStop()

    @contextmanager
    def shielded(self) -> Iterator[None]:
        """A block a second signal must not cut (a checkpoint write); ForcedStop follows it instead."""
        self._shield += 1
        try:
            yield
        finally:
            self._shield -= 1
        if self.forced and not self._shield:
            raise ForcedStop()

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def any_process(accelerator, flag: bool) -> bool:
    """Whether ``flag`` is set on any process (a collective call: every process must make it)."""
    import torch

    if accelerator.num_processes == 1:
        return flag
    reduced = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(reduced.item() > 0)


def forced_stop_message(trainer) -> str:
    """After a second signal: a checkpoint if the weights match a finished step (validation, export); the
    message says what was saved and how to go on."""
    from .checkpoints import own_checkpoints
    from .saving import checkpoint_on_stop

    trainer.stop.forced = False
    if trainer._safe_point is None:
        kept = own_checkpoints(trainer.checkpoints_dir, trainer.ownership.fingerprint)
        where = f"the last checkpoint is {kept[-1]}" if kept else "no checkpoint was saved yet"
        return f"stopped at once during a training step; {where}. Resume with train.resume=auto."
    step = trainer._safe_point[0]
    saved = checkpoint_on_stop(trainer, *trainer._safe_point)
    return f"stopped at once at step {step}; checkpoint saved in {saved}. Resume with train.resume=auto."
