"""The ``train:`` keys that pick the optimizer and its arguments, and the rules between them and the schedule.

Kept apart from the rest of TrainConfig (which inherits them), as the objective's keys are; the optimizer is
built from them in training/optim.py.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

#: train.optimizer's built-in names; anything else must be an import path.
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "lion", "lion8bit", "adafactor", "adamw_schedulefree")


class OptimizerSettings(BaseModel):
    """The optimizer, its keyword arguments and the Adam values the built-ins share."""

    optimizer: str = Field(
        "adamw", description=f"{' | '.join(OPTIMIZERS)}, or an optimizer class's import path (package.module.Class).",
    )
    optimizer_args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the optimizer; they override the adam_* values.",
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1.0e-2, ge=0)
    adam_epsilon: float = Field(1.0e-8, gt=0)
    full_bf16: bool = Field(False, description="Trained weights in bf16 too, no fp32 copy (needs mixed_precision=bf16).")

    @field_validator("optimizer")
    @classmethod
    def _optimizer_name(cls, value: str) -> str:
        if value in OPTIMIZERS or re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", value):
            return value
        raise ValueError(f"choose one of {', '.join(OPTIMIZERS)}, or an import path such as torch.optim.RAdam")

    @model_validator(mode="after")
    def _optimizer_rules(self):
        if self.full_bf16 and self.mixed_precision != "bf16":
            raise ValueError(f"train.full_bf16=true keeps the trained weights in bf16 and needs "
                             f"train.mixed_precision=bf16 (got {self.mixed_precision}); set it, or full_bf16=false")
        own_schedule = {"adamw_schedulefree": ("warms up inside the optimizer (train.lr_warmup_steps)",
                                               ("constant", "constant_with_warmup"))}
        if adafactor_relative_step(self):
            own_schedule["adafactor"] = ("computes its own step size with optimizer_args.relative_step=true "
                                         "(set relative_step=false to use train.learning_rate)", ("constant",))
        if self.optimizer in own_schedule and self.lr_scheduler not in own_schedule[self.optimizer][1]:
            why, allowed = own_schedule[self.optimizer]
            raise ValueError(f"train.optimizer={self.optimizer} {why}, so train.lr_scheduler must be "
                             f"{' or '.join(allowed)} (got {self.lr_scheduler})")
        return self


def adafactor_relative_step(train: OptimizerSettings) -> bool:
    """Adafactor in relative-step mode (its default, and kohya's): no learning rate, its own schedule."""
    return train.optimizer == "adafactor" and bool(train.optimizer_args.get("relative_step", True))
