"""Where a run keeps its files: the one place that knows the layout of an output folder."""

from __future__ import annotations

from pathlib import Path

STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_step(folder: Path) -> int | None:
    """The step a checkpoint folder holds, or None for anything else (a .tmp folder, a stray name)."""
    suffix = folder.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if folder.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def list_checkpoints(checkpoints_dir: Path, containing: str = STATE_FILE) -> list[Path]:
    """Complete checkpoints (holding ``containing``), oldest first; half-written .tmp folders are skipped."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in checkpoints_dir.iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None) if (p / containing).is_file()]


class RunFolder:
    """The paths inside ``<output.dir>``: config, checkpoints, samples, logs, final exports and model card."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def final(self) -> Path:
        """The one file a UI loads (the method's exporter picks it), alone in its folder: InvokeAI refuses
        a folder holding two weight files at any depth, and a UI's model list shows every one."""
        return self.root / "final"

    @property
    def diffusers(self) -> Path:
        """The diffusers-format exports (a pipeline folder or an adapter file), for diffusers code."""
        return self.root / "diffusers"

    @property
    def variants(self) -> Path:
        """Further files of the same result in UI formats (e.g. other weightings, legacy formats)."""
        return self.root / "variants"

    @property
    def model_card(self) -> Path:
        return self.root / "README.md"

    def sample_grid(self, step: int) -> Path:
        return self.samples / f"step-{step:06d}.png"

    @property
    def comparison_grid(self) -> Path:
        return self.samples / "base-vs-trained.png"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    def list_checkpoints(self, containing: str = STATE_FILE) -> list[Path]:
        """This run's complete checkpoints (holding ``containing``), oldest first."""
        return list_checkpoints(self.checkpoints, containing)
