"""Pivotal tuning hooks: new words' rows (Textual Inversion's) and a LoRA-family adapter, trained together.

The rows learn at ``pivotal.learning_rate`` until ``pivotal.stop_fraction`` of the run, their norm pulled
toward the vocabulary's; the adapter (the ``lora:`` section, any type) learns for the whole run.
"""

from __future__ import annotations

from typing import Any

import torch

from ...data.captions import ensure_token
from ...errors import ConfigError
from ...training.step import StepContext
from ..lora.method import LoraMethod
from ..textual_inversion.rows import ROWS_KEY, NewRows, refuse_known_words
from .export import PivotalExporter
from .settings import PivotalSettings


class _RowsStop:
    """Checkpointed flag: a run resumed after the stop step keeps the new rows frozen."""

    def __init__(self, method: "PivotalMethod"):
        self.method = method

    def state_dict(self) -> dict[str, bool]:
        return {"frozen": self.method.rows_frozen}

    def load_state_dict(self, state: dict[str, bool]) -> None:
        if state.get("frozen"):
            self.method.freeze_rows()


class PivotalMethod(LoraMethod):
    """LoRA's adapters plus new rows of the embedding table; every other weight stays as loaded."""

    name = "pivotal"
    exporter_class = PivotalExporter

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pivotal: PivotalSettings = cfg.pivotal
        self.settings = cfg.lora  # LoraMethod's hooks read the adapter's own section
        self.rows = NewRows(self.pivotal.words)
        self.stop_step = self.pivotal.stop_step(cfg.train.max_steps)
        self.start_step = self.pivotal.start_step(cfg.train.max_steps)
        self._adapter_waits = False
        self.rows_frozen = False
        self._vocabulary_norm = 0.0

    # -- setup --------------------------------------------------------------------------------
    def setup(self, models, accelerator) -> None:
        """The adapters (as trainer: lora), then the new words, their rows the table's only trainable part."""
        super().setup(models, accelerator)
        refuse_known_words(models.tokenizer, self.pivotal.words,
                           "pivotal.tokens" if self.pivotal.tokens else "pivotal (its default words <s0>, <s1>, ...)")
        self.rows.add(models.tokenizer, models.text_encoder, self._start_rows(models))
        table = self.rows.train(models.text_encoder)
        if self.start_step:
            for module in self.trained_modules().values():
                for param in module.parameters():
                    if param.requires_grad and param is not table:
                        param.register_hook(self._hold_adapter)
        self._vocabulary_norm = float(self.rows.old_rows().float().norm(dim=1).mean())

    def _start_rows(self, models) -> torch.Tensor:
        """The initializer's token rows, repeated to fill; without one, random rows at the vocabulary's scale."""
        table = models.text_encoder.get_input_embeddings().weight.detach().float()
        n, words = self.pivotal.num_vectors, self.pivotal.initializer
        if words:
            ids = models.tokenizer.encode(words, add_special_tokens=False)
            if not ids:
                raise ConfigError(f"pivotal.initializer: {words!r} has no tokens; give words such as 'red heart'")
            return table[[ids[i % len(ids)] for i in range(n)]].clone()
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        return torch.randn(n, table.shape[1], generator=generator) * table.std()

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """The UNet and the text encoder (its table holds the new rows), whatever the adapter trains."""
        assert self.models is not None, "setup() must run first"
        return {name: getattr(self.models, name) for name in self.pivotal.trained_models()}

    def _table(self, text_encoder: torch.nn.Module | None = None) -> torch.nn.Parameter:
        assert self.models is not None
        return (text_encoder or self.models.text_encoder).get_input_embeddings().weight

    def parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        """The adapter's groups (LoRA's), and the table in its own group at pivotal.learning_rate.

        train.scale_lr scales both alike."""
        table = self._table()
        groups = [{**g, "params": [p for p in g["params"] if p is not table]}
                  for g in super().parameter_groups(learning_rate)]
        scale = learning_rate / self.cfg.train.learning_rate
        embeddings = {"name": "embeddings", "params": [table], "lr": self.pivotal.learning_rate * scale}
        return [g for g in groups if g["params"]] + [embeddings]

    def checkpoint_objects(self) -> list[Any]:
        return [*super().checkpoint_objects(), _RowsStop(self)]

    # -- per step -----------------------------------------------------------------------------
    def _hold_adapter(self, grad: torch.Tensor) -> torch.Tensor:
        """Before pivotal.adapter_start an adapter weight gets a zero gradient (the words learn alone)."""
        return torch.zeros_like(grad) if self._adapter_waits else grad

    def captions(self, captions: list[str], ctx: StepContext) -> list[str]:
        """A caption without the new words gets them in front; an empty one (caption dropout) stays empty.

        Also where the step is known before the backward pass: whether the adapter still waits."""
        self._adapter_waits = ctx.global_step < self.start_step
        phrase = self.pivotal.phrase
        return [ensure_token(c, phrase) if c.strip() else c for c in captions]

    def after_step(self, step: int) -> None:
        """Old rows back bitwise, the new rows' norm pulled, and the rows frozen once the stop step is done."""
        super().after_step(step)
        if self.rows_frozen:
            return
        table = self._table()
        self.rows.restore_old_rows(table)
        self._pull_norm(table)
        if step >= self.stop_step:
            self.freeze_rows()

    def _pull_norm(self, table: torch.Tensor) -> None:
        """Each new row's norm times ``(vocabulary norm / its norm) ** pivotal.norm_pull``."""
        pull = self.pivotal.norm_pull
        if not pull:
            return
        with torch.no_grad():
            rows = table[self.rows.ids]
            norms = rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
            table[self.rows.ids] = rows * (self._vocabulary_norm / norms) ** pull

    def freeze_rows(self) -> None:
        """No more gradient for the table: AdamW skips a weight without one (no decay either)."""
        self._table().requires_grad_(False)
        self.rows_frozen = True

    # -- checkpoints ----------------------------------------------------------------------------
    def trainable_state_dict(self, module_name: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The adapter's tensors, and of the table only the new rows."""
        if module_name != "text_encoder":
            return super().trainable_state_dict(module_name, module)
        table = self._table(module)
        out = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad and p is not table}
        return {**out, ROWS_KEY: self.rows.vectors(module)}

    def load_trainable_state(self, module_name: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        if module_name == "text_encoder":
            tensors = dict(tensors)
            if ROWS_KEY not in tensors:
                raise KeyError(f"tensors {sorted(tensors)[:3]} are not a pivotal checkpoint of {module_name}")
            self.rows.load(module, tensors.pop(ROWS_KEY),
                           "resume with the pivotal.num_vectors and model it was written with")
        super().load_trainable_state(module_name, module, tensors)
