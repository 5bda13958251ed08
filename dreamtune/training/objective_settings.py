"""The ``train:`` keys that shape the objective: loss type, loss weighting, timestep range and noise options.

Kept apart from the rest of TrainConfig (which inherits them) so the objective's keys and their checks read
in one place; the names follow kohya sd-scripts, where most of these options come from.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator


class ObjectiveSettings(BaseModel):
    """Loss and noise options; every default leaves the plain epsilon/v MSE objective unchanged."""

    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = Field(
        "l2", description="Per-element loss: l2 (MSE), l1, huber (2c(sqrt(d^2+c^2)-c)) or smooth_l1 (2(sqrt(d^2+c^2)-c)).",
    )
    huber_c: float = Field(0.1, gt=0, le=1, description="Huber/smooth_l1 threshold c (kohya's default 0.1).")
    huber_schedule: Literal["constant", "exponential", "snr"] = Field(
        "snr", description="How c varies with the timestep: constant c; exponential c^(t/T); snr "
        "(1-c)/(1+sigma_t)^2 + c (kohya's default).",
    )
    debiased_estimation: bool = Field(
        False, description="Weight each sample by 1/sqrt(snr) (v-prediction: 1/(snr+1)), snr clamped at 1000.",
    )
    zero_terminal_snr: bool = Field(
        False, description="Rescale the betas so the last timestep is pure noise (trailing spacing when sampling); "
        "v-prediction models only.",
    )
    min_timestep: int = Field(0, ge=0, description="Train on timesteps t >= this.")
    max_timestep: int | None = Field(
        None, ge=1, description="Train on timesteps t < this (null: the scheduler's num_train_timesteps).",
    )
    multires_noise_iterations: int = Field(
        0, ge=0, description="Pyramid (multi-resolution) noise levels; 0 turns it off (6-10 is usual).",
    )
    multires_noise_discount: float = Field(0.3, gt=0, le=1, description="Weight ratio between pyramid levels.")
    input_perturbation: float = Field(
        0.0, ge=0, description="Extra noise in the noisy input only (the target stays the drawn noise); 0.1 is usual.",
    )
    noise_offset_random_strength: bool = Field(
        False, description="Scale train.noise_offset by a per-sample uniform draw in [0, 1).",
    )

    @model_validator(mode="after")
    def _check_objective(self):
        if self.max_timestep is not None and self.max_timestep <= self.min_timestep:
            raise ValueError(f"train.max_timestep ({self.max_timestep}) must be above train.min_timestep "
                             f"({self.min_timestep}): timesteps are drawn from [min_timestep, max_timestep)")
        if self.noise_offset_random_strength and not getattr(self, "noise_offset", 0):
            raise ValueError("train.noise_offset_random_strength scales train.noise_offset, which is 0; "
                             "set train.noise_offset (e.g. 0.1) or drop noise_offset_random_strength")
        return self


def objective_card(train: ObjectiveSettings, data) -> str:
    """The objective options a run changed from the plain loss, as model-card text ('' for none)."""
    parts = []
    if train.loss_type != "l2":
        huber = f" (c {train.huber_c}, {train.huber_schedule} schedule)" if train.loss_type in ("huber", "smooth_l1") else ""
        parts.append(f"loss {train.loss_type}{huber}")
    if data.masked_loss:
        parts.append(f"masked loss (unmasked weight {data.unmasked_weight})")
    if train.debiased_estimation:
        parts.append("debiased estimation")
    if train.min_timestep or train.max_timestep is not None:
        parts.append(f"timesteps [{train.min_timestep}, {train.max_timestep or 'T'})")
    if train.multires_noise_iterations:
        parts.append(f"multires noise ({train.multires_noise_iterations} levels, discount {train.multires_noise_discount})")
    if train.input_perturbation:
        parts.append(f"input perturbation {train.input_perturbation}")
    if train.noise_offset_random_strength:
        parts.append("random noise-offset strength")
    if train.zero_terminal_snr:
        parts.append("zero-terminal SNR: sample with a scheduler built with rescale_betas_zero_snr=True and "
                     "timestep_spacing='trailing' (e.g. DDIMScheduler.from_config(pipe.scheduler.config, "
                     "rescale_betas_zero_snr=True, timestep_spacing='trailing')), or images come out washed out")
    return ", ".join(parts)
