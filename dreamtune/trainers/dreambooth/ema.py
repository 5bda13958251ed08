"""The EMA DreamBooth keeps of its trained weights: diffusers' EMAModel, stepped in training steps."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from diffusers.training_utils import EMAModel


class TrainingEMA(EMAModel):
    """diffusers' EMAModel with the decay ramp in training steps, updates every N steps, and a home device.

    ``offload`` keeps the average in (pinned) CPU memory and brings it to the GPU only for the update,
    as diffusers' ``--offload_ema`` does; the loop has already freed the gradients by then.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], *, every: int, home: torch.device, offload: bool,
                 **ema_kwargs: Any):
        super().__init__(parameters, **ema_kwargs)
        self.every, self.home, self.offload = every, torch.device(home), offload
        self.num_params = len(self.shadow_params)
        self._settle()

    def _settle(self) -> None:
        """Put the shadow weights where they rest between updates, in fp32 whatever the model's dtype."""
        if not self.offload:
            self.to(device=self.home, dtype=torch.float32)
            return
        self.to(device="cpu", dtype=torch.float32)
        if self.home.type == "cuda":
            self.pin_memory()

    def get_decay(self, optimization_step: int) -> float:
        """The per-step decay compounded over the ``every`` steps one update stands for."""
        return super().get_decay(optimization_step) ** self.every

    def update(self, step: int, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Average in the current weights after training step ``step``."""
        self.optimization_step = step - 1  # step() adds one: the ramp counts training steps, not updates
        if not self.offload:
            self.step(parameters)
            return
        resting = self.shadow_params
        self.shadow_params = [s.to(self.home, non_blocking=True) for s in resting]
        self.step(parameters)
        for cpu, device in zip(resting, self.shadow_params):
            cpu.copy_(device)
        self.shadow_params = resting

    def load_state_dict(self, state_dict: dict) -> None:
        """Take the average and step count from a checkpoint; decay settings stay the current config's."""
        super().load_state_dict({k: state_dict[k] for k in ("shadow_params", "optimization_step") if k in state_dict})
        if len(self.shadow_params) != self.num_params:
            raise ValueError(
                f"train.resume: the checkpoint's EMA holds {len(self.shadow_params)} tensors but the model has "
                f"{self.num_params}; resume with the config that wrote it, or start fresh with train.resume=null"
            )
        self._settle()
