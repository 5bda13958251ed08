"""Loss types, Huber schedules, debiased estimation, zero-terminal SNR, timestep range and the noise options,
each against a hand computation; defaults must leave the objective's draws and values exactly as before."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from dreamtune.config import TrainConfig
from dreamtune.errors import ConfigError
from dreamtune.models.pipeline import inference_scheduler
from dreamtune.training.losses import (
    debiased_weights,
    elementwise_loss,
    huber_threshold,
    loss_weights,
    reduce_per_sample,
)
from dreamtune.training.objective import (
    Objective,
    min_snr_weights,
    pyramid_noise,
    sample_generators,
    sample_noise,
    sample_timesteps,
    training_scheduler,
)


def sd_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type)


def alpha_bar(scheduler, t: int) -> float:
    return float(scheduler.alphas_cumprod.double()[t])


class ZeroUNet:
    """Predicts zeros and remembers what it was given."""

    def __call__(self, noisy, timesteps, hidden, return_dict=False):
        self.noisy, self.timesteps = noisy.clone(), timesteps.clone()
        return (torch.zeros_like(noisy),)


MOMENTS = torch.stack([torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
                       torch.full((3, 4, 8, 8), 0.1)], dim=1)


def run(train: TrainConfig, scheduler=None, mask=None, unmasked_weight=0.0, seed=7):
    """Objective.losses on fixed moments with a zero-predicting UNet; returns (losses, unet)."""
    unet = ZeroUNet()
    objective = Objective(scheduler or sd_scheduler(), train, unmasked_weight)
    losses = objective.losses(unet, MOMENTS, None, sample_generators(seed, 0, [0, 1, 2]), mask)
    return losses, unet


# -- loss types -------------------------------------------------------------------------------------------------
def test_each_loss_type_matches_its_formula_on_known_tensors():
    pred = torch.tensor([[0.0, 0.05, 1.0, -3.0]])
    target = torch.zeros_like(pred)
    c = 0.1
    diffs = [0.0, 0.05, 1.0, 3.0]
    expected = {
        "l2": [d * d for d in diffs],
        "l1": diffs,
        "smooth_l1": [2 * (math.sqrt(d * d + c * c) - c) for d in diffs],
        "huber": [2 * c * (math.sqrt(d * d + c * c) - c) for d in diffs],
    }
    for kind, values in expected.items():
        got = elementwise_loss(pred, target, kind, torch.tensor([c]))
        torch.testing.assert_close(got, torch.tensor([values]), rtol=1e-6, atol=1e-7, msg=kind)
    # Huber is quadratic well inside c and linear far outside it: the two regimes it exists for.
    huber = elementwise_loss(pred, target, "huber", torch.tensor([c]))[0]
    assert huber[1].item() == pytest.approx(0.05**2, rel=0.15)
    assert huber[3].item() == pytest.approx(2 * c * 3.0, rel=0.05)


def test_huber_threshold_is_per_sample():
    pred, target = torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    got = elementwise_loss(pred, target, "huber", torch.tensor([0.1, 1.0])).flatten()
    want = [2 * c * (math.sqrt(1 + c * c) - c) for c in (0.1, 1.0)]
    torch.testing.assert_close(got, torch.tensor(want))


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_schedules_at_several_timesteps(schedule):
    scheduler, c = sd_scheduler(), 0.1
    timesteps = torch.tensor([0, 250, 500, 999])
    got = huber_threshold(scheduler, timesteps, schedule, c).double()
    if schedule == "constant":
        want = [c] * 4
    elif schedule == "exponential":  # kohya: exp(-(-ln c / T) t) = c^(t/T)
        want = [c ** (t / 1000) for t in (0, 250, 500, 999)]
    else:  # kohya: (1 - c) / (1 + sigma_t)^2 + c, sigma_t = sqrt((1 - abar) / abar)
        want = [(1 - c) / (1 + math.sqrt((1 - alpha_bar(scheduler, t)) / alpha_bar(scheduler, t))) ** 2 + c
                for t in (0, 250, 500, 999)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    if schedule != "constant":  # near 1 for clean inputs, towards c for pure noise
        assert got[0] > 0.9 and got[-1] < 0.11 and (got.diff() < 0).all()


# -- weights -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_weights(prediction_type):
    scheduler = sd_scheduler(prediction_type)
    timesteps = torch.tensor([0, 100, 500, 999])
    snr = [min(alpha_bar(scheduler, t) / (1 - alpha_bar(scheduler, t)), 1000.0) for t in (0, 100, 500, 999)]
    assert alpha_bar(scheduler, 0) / (1 - alpha_bar(scheduler, 0)) > 1000  # the clamp is exercised at t=0
    if prediction_type == "epsilon":
        want = [1 / math.sqrt(s) for s in snr]
    else:
        want = [1 / (s + 1) for s in snr]
    torch.testing.assert_close(debiased_weights(scheduler, timesteps).double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-8)


def test_min_snr_and_debiased_both_multiply_the_loss():
    plain, unet = run(TrainConfig())
    both, _ = run(TrainConfig(snr_gamma=5.0, debiased_estimation=True))
    scheduler, t = sd_scheduler(), unet.timesteps
    want = plain * min_snr_weights(scheduler, t, 5.0) * debiased_weights(scheduler, t)
    torch.testing.assert_close(both, want)
    assert not torch.allclose(both, plain)


# -- masks in the loss -------------------------------------------------------------------------------------------
def test_masked_loss_is_the_weighted_mean_over_the_mask():
    loss = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert reduce_per_sample(loss, loss_weights(mask, (2, 2), 0.0)).item() == pytest.approx((1 + 3) / 2)
    # background weighted 0.5: (1 + 3 + 0.5 * (2 + 4)) / (2 + 0.5 * 2)
    assert reduce_per_sample(loss, loss_weights(mask, (2, 2), 0.5)).item() == pytest.approx(7 / 3)
    assert reduce_per_sample(loss, loss_weights(torch.ones_like(mask), (2, 2), 0.0)).item() == pytest.approx(2.5)
    # an empty mask with no background weight counts nothing (not NaN)
    assert reduce_per_sample(loss, loss_weights(torch.zeros_like(mask), (2, 2), 0.0)).item() == 0.0


def test_masks_are_area_downsampled_to_the_latent():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, :6] = 1  # 6 of 16 columns: latent column 0 fully in, column 1 half in
    weights = loss_weights(mask, (2, 2), 0.0)
    torch.testing.assert_close(weights[0, 0], torch.tensor([[0.75, 0.0], [0.75, 0.0]]))


def test_full_mask_gives_the_unmasked_loss():
    plain, _ = run(TrainConfig())
    masked, _ = run(TrainConfig(), mask=torch.ones(3, 1, 64, 64))
    torch.testing.assert_close(masked, plain)


# -- zero-terminal SNR ---------------------------------------------------------------------------------------------
def test_zero_terminal_snr_rescales_training_and_sampling():
    scheduler = training_scheduler(sd_scheduler("v_prediction"), True)
    assert scheduler.alphas_cumprod[-1].item() == 0.0
    assert alpha_bar(sd_scheduler(), 999) > 0.004  # the plain SD schedule never reaches pure noise
    sampler = inference_scheduler(scheduler)
    assert sampler.config.timestep_spacing == "trailing" and sampler.config.rescale_betas_zero_snr
    sampler.set_timesteps(25)
    assert int(sampler.timesteps[0]) == 999  # sampling starts at the pure-noise step it was trained on
    assert training_scheduler(sd_scheduler("v_prediction"), False).alphas_cumprod[-1].item() > 0


def test_zero_terminal_snr_refuses_epsilon_prediction():
    with pytest.raises(ConfigError, match=r"zero_terminal_snr.*model\.prediction_type=v_prediction"):
        training_scheduler(sd_scheduler("epsilon"), True)


def test_zero_terminal_snr_weights_stay_finite_at_the_last_step():
    scheduler = training_scheduler(sd_scheduler("v_prediction"), True)
    t = torch.tensor([999, 500])
    assert min_snr_weights(scheduler, t, 5.0)[0].item() == 0.0  # min(0, g) / (0 + 1)
    assert debiased_weights(scheduler, t)[0].item() == pytest.approx(1.0)  # 1 / (0 + 1)
    assert huber_threshold(scheduler, t, "snr", 0.1)[0].item() == pytest.approx(0.1)
    losses, _ = run(TrainConfig(zero_terminal_snr=True, snr_gamma=5.0, debiased_estimation=True, min_timestep=990),
                    scheduler=scheduler)
    assert torch.isfinite(losses).all()


# -- timestep range ---------------------------------------------------------------------------------------------
def test_timesteps_stay_in_range_and_default_is_unchanged():
    scheduler = sd_scheduler()
    ts = sample_timesteps(scheduler, sample_generators(3, 0, list(range(400))), torch.device("cpu"), 200, 300)
    assert ts.min() >= 200 and ts.max() < 300 and ts.min() <= 203 and ts.max() >= 296
    default = sample_timesteps(scheduler, sample_generators(3, 0, [0, 1]), torch.device("cpu"))
    old = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in sample_generators(3, 0, [0, 1])])
    assert torch.equal(default, old)
    _, unet = run(TrainConfig(min_timestep=900))
    assert (unet.timesteps >= 900).all()


def test_timestep_range_is_checked():
    with pytest.raises(ValueError, match="max_timestep .* must be above train.min_timestep"):
        TrainConfig(min_timestep=500, max_timestep=500)
    with pytest.raises(ConfigError, match="within the model's 1000 training timesteps"):
        Objective(sd_scheduler(), TrainConfig(max_timestep=1001))


# -- noise options -----------------------------------------------------------------------------------------------
def test_pyramid_noise_shape_statistics_and_determinism():
    def draw(positions):
        base = torch.zeros(len(positions), 4, 32, 32)
        return pyramid_noise(base, sample_generators(5, 0, positions), iterations=6, discount=0.8)

    noise = draw(list(range(64)))
    assert noise.shape == (64, 4, 32, 32)
    torch.testing.assert_close(noise.flatten(1).std(dim=1), torch.ones(64), rtol=1e-5, atol=1e-5)
    # Low frequencies: white noise's per-channel mean has variance 1/(32*32); the pyramid's is far larger.
    assert noise.mean(dim=(2, 3)).pow(2).mean() > 20 / (32 * 32)
    assert torch.equal(draw([3]), draw(list(range(64)))[3:4])  # one sample's noise ignores its batch
    assert torch.equal(draw([0, 1]), draw([0, 1]))


def test_random_noise_offset_strength_is_uniform_per_sample():
    latents = torch.zeros(4, 4, 8, 8)
    got = sample_noise(latents, 0.1, sample_generators(2, 0, [0, 1, 2, 3]), random_strength=True)
    strengths = []
    for i, g in enumerate(sample_generators(2, 0, [0, 1, 2, 3])):
        base, offset, u = torch.randn(4, 8, 8, generator=g), torch.randn(4, 1, 1, generator=g), torch.rand(1, generator=g)
        torch.testing.assert_close(got[i], base + 0.1 * offset * u)
        strengths.append(u.item())
    assert len(set(strengths)) == 4 and all(0 <= s < 1 for s in strengths)


def test_input_perturbation_changes_the_noisy_input_not_the_target():
    plain, plain_unet = run(TrainConfig())
    perturbed, unet = run(TrainConfig(input_perturbation=0.1))
    # The zero UNet's loss is the target's mean square: the target is the original noise.
    torch.testing.assert_close(perturbed, plain)
    assert torch.equal(unet.timesteps, plain_unet.timesteps)
    scheduler, generators = sd_scheduler(), sample_generators(7, 0, [0, 1, 2])
    mean, std = MOMENTS.unbind(1)
    latents = mean + std * torch.stack([torch.randn(4, 8, 8, generator=g) for g in generators])
    noise = torch.stack([torch.randn(4, 8, 8, generator=g) for g in generators])
    timesteps = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in generators])
    extra = torch.stack([torch.randn(4, 8, 8, generator=g) for g in generators])
    torch.testing.assert_close(unet.noisy, scheduler.add_noise(latents, noise + 0.1 * extra, timesteps))
    assert not torch.allclose(unet.noisy, plain_unet.noisy)


def test_defaults_reproduce_the_plain_objective_bit_for_bit():
    losses, unet = run(TrainConfig())
    scheduler, generators = sd_scheduler(), sample_generators(7, 0, [0, 1, 2])
    mean, std = MOMENTS.unbind(1)
    latents = mean + std * torch.stack([torch.randn(4, 8, 8, generator=g) for g in generators])
    noise = torch.stack([torch.randn(4, 8, 8, generator=g) for g in generators])
    timesteps = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in generators])
    assert torch.equal(unet.noisy, scheduler.add_noise(latents, noise, timesteps))
    assert torch.equal(losses, torch.nn.functional.mse_loss(torch.zeros_like(noise), noise, reduction="none")
                       .flatten(1).mean(dim=1))


def test_samplers_without_the_option_become_ddim_on_the_zero_snr_schedule():
    from diffusers import DDIMScheduler, PNDMScheduler

    from dreamtune.models.pipeline import with_zero_terminal_snr

    sampler = with_zero_terminal_snr(PNDMScheduler.from_config(sd_scheduler("v_prediction").config))
    assert isinstance(sampler, DDIMScheduler) and sampler.config.timestep_spacing == "trailing"
    assert sampler.alphas_cumprod[-1].item() == 0.0 and sampler.config.prediction_type == "v_prediction"


def test_a_run_with_every_option_trains_samples_and_says_so(tiny_model_dir, tmp_path):
    from dreamtune.training.loop import Trainer

    from .conftest import tiny_run_config

    cfg = tiny_run_config(
        "tiny_lora.yaml", tiny_model_dir, tmp_path, "train.max_steps=2", "train.save_every=0",
        "validation.prompts=[a photo of sks toy]", "validation.images_per_prompt=1", "validation.num_inference_steps=2",
        "model.prediction_type=v_prediction", "train.zero_terminal_snr=true", "train.loss_type=huber",
        "train.debiased_estimation=true", "train.snr_gamma=5", "train.min_timestep=100", "train.max_timestep=1000",
        "train.multires_noise_iterations=4", "train.input_perturbation=0.1", "train.noise_offset=0.05",
        "train.noise_offset_random_strength=true",
    )
    trainer = Trainer(cfg)
    result = trainer.run()
    assert result.global_step == 2 and result.last_loss == result.last_loss and result.samples
    assert trainer.models.noise_scheduler.alphas_cumprod[-1].item() == 0.0
    assert inference_scheduler(trainer.models.noise_scheduler).config.timestep_spacing == "trailing"
    card = (tmp_path / "README.md").read_text()
    for words in ("loss huber (c 0.1, snr schedule)", "debiased estimation", "timesteps [100, 1000)",
                  "multires noise (4 levels", "input perturbation 0.1", "rescale_betas_zero_snr=True"):
        assert words in card
