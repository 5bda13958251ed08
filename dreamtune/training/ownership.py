"""Which run an output folder belongs to: the config fingerprint in run.json, and the lock of the live run.

A run folder holds one run. The fingerprint covers what changes the weights (trainer, model, data, train
and the method section, seed included), not where files go, logging or validation, and not the keys a
resume may change (max_steps, checkpoint cadence and limit, resume itself). A new run into a folder of
another run is refused, resume refuses another run's checkpoint, and rotation only deletes this run's.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from ..config import RunConfig, dump_config
from ..errors import DreamtuneError
from .run_folder import STATE_FILE, RunFolder, list_checkpoints

#: train.* keys a resume may change without making it another run.
RESUMABLE_TRAIN_KEYS = ("resume", "max_steps", "save_every", "checkpoints_total_limit",
                        # How the math runs, not what it computes (training/speed.py).
                        "compile", "channels_last", "allow_tf32", "attention", "adamw_impl")
#: data.* keys that say where the frozen encoders' outputs come from, not what they are.
CACHE_DATA_KEYS = ("cache_latents", "cache_text_embeddings", "cache_dir")


class RunFolderTaken(DreamtuneError):
    """output.dir holds another run (or this run's finished results), or a live run holds its lock."""


class OutputNotWritable(DreamtuneError, OSError):
    """output.dir cannot be created or written; found before any model loads."""


def fingerprint_fields(cfg: RunConfig) -> dict:
    """The config values that change the trained weights, as flat ``section.key`` -> value.

    Keys at their default are left out, so a release that adds a key (at a default that keeps the old
    behaviour) does not turn a run's resume into another run.
    """
    dumped = cfg.model_dump(mode="json", exclude_defaults=True)
    dumped.setdefault(cfg.trainer, {})
    train = {k: v for k, v in dumped.get("train", {}).items() if k not in RESUMABLE_TRAIN_KEYS}
    data = {k: v for k, v in dumped.get("data", {}).items() if k not in CACHE_DATA_KEYS}
    sections = {"trainer": dumped["trainer"], "model": dumped.get("model", {}), "data": data, "train": train,
                cfg.trainer: dumped[cfg.trainer]}
    flat: dict = {}
    for name, value in sections.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{key}": sub for key, sub in value.items()})
        else:
            flat[name] = value
    return flat


def run_fingerprint(cfg: RunConfig) -> str:
    """A short hash of :func:`fingerprint_fields`: equal for a run and its resumes."""
    text = json.dumps(fingerprint_fields(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_fingerprint(folder: Path) -> str | None:
    """The fingerprint a checkpoint was written with; None for one written before fingerprints existed."""
    try:
        return json.loads((folder / STATE_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


def own_checkpoints(checkpoints_dir: Path, fingerprint: str) -> list[Path]:
    """Complete checkpoints of the run with ``fingerprint`` (and unmarked older ones), oldest first."""
    return [p for p in list_checkpoints(checkpoints_dir) if checkpoint_fingerprint(p) in (fingerprint, None)]


def _differences(recorded: dict, current: dict) -> list[str]:
    keys = sorted(set(recorded) | set(current))
    return [f"{k} ({recorded.get(k)!r} there, {current.get(k)!r} now)" for k in keys if recorded.get(k) != current.get(k)]


def _choices(root: Path) -> str:
    return (f"Set output.overwrite=true to replace it, choose another output.dir, or continue that run with its "
            f"own config and train.resume=auto (its config is {root / 'config.yaml'}).")


class RunOwnership:
    """Checks (every process) and claims (main process) a run folder for one run."""

    def __init__(self, run: RunFolder, cfg: RunConfig):
        self.run, self.cfg = run, cfg
        self.fields = fingerprint_fields(cfg)
        self.fingerprint = run_fingerprint(cfg)
        self._locked = False

    @property
    def record(self) -> Path:
        return self.run.root / "run.json"

    @property
    def lock(self) -> Path:
        return self.run.root / "run.lock"

    # -- checks, before any model loads -----------------------------------------------------------
    def check(self) -> None:
        """Refuse an unwritable folder, a live run's lock, another run's folder, or finished results."""
        self.check_writable()
        self.check_lock()
        if self.cfg.output.overwrite:
            return
        root, recorded = self.run.root, self._recorded()
        if recorded is not None and recorded.get("fingerprint") != self.fingerprint:
            changed = _differences(recorded.get("fields", {}), self.fields)
            raise RunFolderTaken(
                f"output.dir {root} holds another run (its config differs in {', '.join(changed[:4]) or 'its fingerprint'}"
                f"{', ...' if len(changed) > 4 else ''}); a new run there would mix with its checkpoints and replace "
                f"its final/. {_choices(root)}"
            )
        checkpoints = list_checkpoints(self.run.checkpoints)
        foreign = [p for p in checkpoints if checkpoint_fingerprint(p) not in (self.fingerprint, None)]
        if foreign:
            raise RunFolderTaken(
                f"output.dir {root}: checkpoint {foreign[-1].name} was written by another run (another config). "
                f"{_choices(root)}"
            )
        if self.cfg.train.resume is None and (checkpoints or self.run.final.exists()):
            found = "final/" if self.run.final.exists() else f"checkpoints up to {checkpoints[-1].name}"
            raise RunFolderTaken(
                f"output.dir {root} already holds this run's results ({found}). Continue it with train.resume=auto, "
                "set output.overwrite=true to start over (its files are deleted), or choose another output.dir."
            )

    def check_writable(self) -> None:
        """Create output.dir and write a probe file in it; a failure names the folder and the reason."""
        root = self.run.root
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=root)
            try:
                os.write(fd, b"ok")
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise OutputNotWritable(
                f"output.dir {root} is not writable ({reason}); fix its permissions or free space, or set "
                "output.dir to a writable folder"
            ) from err

    def check_lock(self) -> None:
        """Refuse when another live process holds run.lock."""
        holder = self._lock_holder()
        if holder is None or not _alive(holder):
            return
        raise RunFolderTaken(
            f"output.dir {self.run.root} is in use by a live run (pid {holder.get('pid')} on {holder.get('host')}, "
            f"since {holder.get('since')}). Wait for it to finish or choose another output.dir; if that run is gone, "
            f"delete {self.lock}."
        )

    # -- claim, main process only ---------------------------------------------------------------
    def claim(self) -> None:
        """Take the lock, clear a replaced run (output.overwrite), record the fingerprint and config."""
        self._take_lock()
        if self.cfg.output.overwrite:
            self._clear_previous_run()
        record = {"fingerprint": self.fingerprint, "fields": self.fields}
        self.record.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        self.run.config.write_text(dump_config(self.cfg))

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self._locked:
            holder = self._lock_holder()
            if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.lock.unlink(missing_ok=True)
            self._locked = False

    def _take_lock(self) -> None:
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.check_lock()  # a live holder is refused; a stale lock is replaced
                self.lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            self._locked = True
            return
        self.check_lock()

    def _clear_previous_run(self) -> None:
        """output.overwrite: the previous run's results go (only the run-folder entries dreamtune writes)."""
        for folder in (self.run.checkpoints, self.run.final, self.run.samples, self.run.logs):
            shutil.rmtree(folder, ignore_errors=True)
        for path in (self.run.model_card, self.record, self.run.config):
            path.unlink(missing_ok=True)

    def _recorded(self) -> dict | None:
        try:
            return json.loads(self.record.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise RunFolderTaken(f"{self.record} is unreadable ({err}); delete it if {self.run.root} holds no run "
                                 "you want to keep") from err

    def _lock_holder(self) -> dict | None:
        try:
            holder = json.loads(self.lock.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": None, "host": None, "since": "unknown"}  # half-written: treated as stale
        return holder if isinstance(holder, dict) else {"pid": None, "host": None, "since": "unknown"}


def _alive(holder: dict) -> bool:
    """Whether the lock's process still runs: by pid on this host; a lock from another host counts as live."""
    pid, host = holder.get("pid"), holder.get("host")
    if not isinstance(pid, int):
        return False
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return False  # an earlier run in this very process (tests, sweeps) that ended without releasing
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM
    return True

