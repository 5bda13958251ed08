"""The one StableDiffusionPipeline builder and the one scheduler resolver."""

from __future__ import annotations

from typing import Any

from ..errors import ModelLoadError


def resolve_scheduler(config: dict[str, Any]):
    """The scheduler that ``config["_class_name"]`` names (PNDM, SD 1.5's own, when unnamed), built from ``config``.

    An unknown name is refused with the known ones, never replaced silently.
    """
    import diffusers

    name = str(config.get("_class_name", "PNDMScheduler"))
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and
                       isinstance(getattr(diffusers, n, None), type) and issubclass(getattr(diffusers, n), diffusers.SchedulerMixin))
        raise ModelLoadError(f"scheduler class {name!r} is not a diffusers scheduler; known: {', '.join(known)}")
    return cls.from_config(config)


def inference_scheduler(noise_scheduler) -> Any:
    """DPM-Solver++ (2M) built from the training schedule: good images in ~25 steps."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(noise_scheduler.config)


def with_zero_terminal_snr(scheduler) -> Any:
    """``scheduler`` on the zero-terminal-SNR schedule: betas rescaled so the last step is pure noise, timesteps
    spaced from it ("trailing"). Samplers without that option (PNDM) become DDIM, the sampler the paper used."""
    import inspect

    from diffusers import DDIMScheduler

    cls = type(scheduler)
    if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
        cls = DDIMScheduler
    return cls.from_config(scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


def build_pipeline(tokenizer, text_encoder, vae, unet, scheduler, *, progress_bar: bool = False):
    """A StableDiffusionPipeline over the given modules (no copies), without the safety checker."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe

