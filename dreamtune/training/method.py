"""What a training method implements: a few hooks the shared loop calls, and an exporter for its files."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import RunConfig
from ..data.caption_rules import CaptionRules, fill_template
from ..models.loading import BaseModel
from ..models.text import encode_tokens
from .checkpoints import copy_into_parameters
from .run_folder import RunFolder
from .step import StepContext

#: What a set of weights is used for: validation samples or the exported files.
Purpose = Literal["sample", "export"]


class Exporter:
    """Writes a method's files (the UI file alone in ``final/``) and tells the model card how to use them."""

    def __init__(self, cfg: RunConfig, method: "TrainingMethod"):
        self.cfg, self.method = cfg, method
        self.run = RunFolder(cfg.output.dir)

    def write(self, out: RunFolder, modules: dict[str, torch.nn.Module], step: int) -> list[Path]:
        """Write the files into ``out.final`` (the UI file), ``out.diffusers`` and ``out.variants``; return their
        paths. ``out`` is a staging copy of the run folder, published whole once every file is written."""
        raise NotImplementedError

    def ui_file(self, files: list[Path]) -> Path | None:
        """The one file to give A1111/Forge, ComfyUI or InvokeAI, or None when no UI loads what this method writes."""
        return None

    def for_uis(self, ui: str) -> str:
        """The model card's line naming the file for UIs (``ui``, relative to the run folder)."""
        return f"- For UIs (AUTOMATIC1111/Forge, ComfyUI, InvokeAI): `{ui}`\n"

    def trigger(self) -> str | None:
        """The word that calls up what was learned: ``data.token``, else the instance prompt; None for a style."""
        return self.cfg.data.token or self._instance_prompt()

    def example_prompt(self) -> str:
        """A prompt that shows what was learned, for the model card's code."""
        token = self.cfg.data.token
        return self._instance_prompt() or (f"a photo of {token}" if token else "a photo")

    def _instance_prompt(self) -> str | None:
        data = self.cfg.data
        rules = CaptionRules(token=data.token, class_name=data.class_name)
        return fill_template(data.instance_prompt, rules) if data.instance_prompt else None

    def usage(self, final: Path, files: list[Path]) -> str:
        """Markdown for the model card's "How to use it": diffusers code and where each UI wants the file."""
        return ""


class TrainingMethod:
    """Base class: freeze everything, train what a subclass unfreezes, export through ``exporter_class``.

    Hooks, in the order the loop calls them: ``setup`` -> ``trained_modules`` -> ``parameter_groups`` ->
    ``class_records`` -> per micro-batch ``captions``, ``encode_text``, ``loss`` -> per step ``after_step``;
    ``weights`` around sampling and export; ``checkpoint_objects`` and the ``*_state`` pair for checkpoints.
    """

    name = "base"
    exporter_class: type[Exporter] = Exporter

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.settings = cfg.method_settings
        self.models: BaseModel | None = None

    # -- setup --------------------------------------------------------------------------------
    def setup(self, models: BaseModel, accelerator) -> None:
        """Freeze every weight; subclasses then add or unfreeze what they train and create their state."""
        self.models = models
        for module in (models.unet, models.vae, models.text_encoder):
            module.requires_grad_(False)

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """Name -> module for every model holding trainable weights (prepared, accumulated, saved)."""
        assert self.models is not None, "setup() must run first"
        names = self.settings.trained_models()
        return {name: getattr(self.models, name) for name in names}

    def parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        """One optimizer group per trained module, at the section's ``<module>_lr`` if set, else ``learning_rate``."""
        return [{"name": name, "params": [p for p in module.parameters() if p.requires_grad],
                 "lr": getattr(self.settings, f"{name}_lr", None) or learning_rate}
                for name, module in self.trained_modules().items()]

    def class_records(self, accelerator) -> list | None:
        """Examples paired with each instance example (prior preservation), as data.sources.Record list."""
        return None

    def checkpoint_objects(self) -> list[Any]:
        """Stateful extras made in setup (state_dict/load_state_dict), saved and restored with checkpoints."""
        return []

    def trainable_state_dict(self, module_name: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of ``module``: only its trainable tensors, by default."""
        return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}

    def load_trainable_state(self, module_name: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Put back (on resume) what ``trainable_state_dict`` saved; by default by parameter name."""
        copy_into_parameters(module_name, module, tensors)

    # -- per step -----------------------------------------------------------------------------
    def captions(self, captions: list[str], ctx: StepContext) -> list[str]:
        """Rewrite a micro-batch's captions before tokenizing (e.g. templates, a multi-vector token)."""
        return captions

    def encode_text(self, text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Per-token conditioning for the UNet: the text encoder's last hidden state, or the layer model.clip_skip
        names, for each 77-token window of ``input_ids`` (see models/text.py)."""
        return encode_tokens(text_encoder, input_ids, self.cfg.model.clip_skip)

    def loss(self, per_sample: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """Reduce per-sample (already SNR-weighted) losses to the loss to minimise, plus scalars to log."""
        return per_sample.mean(), {}

    def after_step(self, step: int) -> None:
        """Called after each optimizer step with the number of steps done (EMA update, restore frozen rows)."""

    def weights(self, purpose: Purpose, modules: dict[str, torch.nn.Module]) -> AbstractContextManager:
        """The weights to sample or export with, swapped into ``modules`` for the block (e.g. an EMA)."""
        return nullcontext()
