"""The run's README.md: what was trained, from what, and how to load each exported file."""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from .method import Exporter
from .objective_settings import objective_card
from .run_folder import RunFolder


def write_model_card(run: RunFolder, cfg: RunConfig, exporter: Exporter, exported: list[Path], step: int) -> Path:
    """Write the model card; it repeats the settings a user needs to reproduce or use the result."""
    trigger = exporter.trigger() or "(none: the model's style applies to any prompt)"
    ui = exporter.ui_file(exported)
    files = "\n".join(f"- `{p.relative_to(run.root)}`" + (" (the file for UIs)" if p == ui else "") for p in exported)
    for_uis = exporter.for_uis(ui.relative_to(run.root).as_posix()) if ui is not None else ""
    t = cfg.train
    settings = (
        f"steps {step}, batch {t.batch_size} x accumulation {t.gradient_accumulation}, learning rate "
        f"{t.learning_rate} ({t.lr_scheduler}, warmup {t.lr_warmup_steps}), optimizer {t.optimizer}, "
        f"precision {t.mixed_precision}, resolution {cfg.data.resolution}, seed {t.seed}"
    )
    if cfg.model.clip_skip != 1 or cfg.data.max_token_length != 75:
        settings += f", clip skip {cfg.model.clip_skip}, captions up to {cfg.data.max_token_length} tokens"
    if extra := cfg.method_settings.card_settings():
        settings += f", {extra}"
    if objective := objective_card(t, cfg.data):
        settings += f", {objective}"
    run.model_card.write_text(
        f"# {cfg.output.name}\n\n"
        f"A **{cfg.trainer}** fine-tune of `{cfg.model.pretrained}` made with dreamtune.\n\n"
        f"{for_uis}- Trigger: `{trigger}`\n- Example prompt: `{exporter.example_prompt()}`\n- Settings: {settings}\n"
        f"- Full config: `config.yaml`\n\n"
        f"## Files\n\n{files}\n\n## How to use it\n\n{exporter.usage(run.final, exported)}\n"
    )
    return run.model_card
