"""Min-SNR-gamma weights against the formula from the scheduler's own alphas (epsilon and v-prediction)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from dreamtune.training.objective import min_snr_weights

TIMESTEPS = torch.tensor([0, 20, 100, 400, 999])


def snr_of(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod.double()[timesteps]
    return alphas / (1 - alphas)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_paper(prediction_type):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    gamma = 5.0
    snr = snr_of(scheduler, TIMESTEPS)
    assert (snr > gamma).any() and (snr < gamma).any()  # both sides of the clamp are exercised
    weights = min_snr_weights(scheduler, TIMESTEPS, gamma).double()
    denominator = snr + 1 if prediction_type == "v_prediction" else snr
    torch.testing.assert_close(weights, snr.clamp(max=gamma) / denominator, rtol=1e-5, atol=1e-7)
    if prediction_type == "epsilon":
        assert weights[-1] == pytest.approx(1.0) and weights[0] == pytest.approx(gamma / snr[0].item(), rel=1e-5)
    else:  # v already carries (snr + 1): never above 1, and below 1 even where snr < gamma
        assert (weights < 1).all()
