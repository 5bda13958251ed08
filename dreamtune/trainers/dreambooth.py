"""DreamBooth: every UNet weight trains (the text encoder too when asked), with EMA and prior preservation."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel

from ..weights.single_file import SD1_CONFIG_DIR, save_single_file
from .class_images import prepare_class_images
from .config import DreamBoothSettings, RunConfig
from .method import TrainingMethod
from .models import BaseModel, load_base_model
from .sampling import build_pipeline

EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
        """Put the shadow weights where they rest between updates."""
        if not self.offload:
            self.to(device=self.home)
            return
        self.to(device="cpu")
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


class _TextEncoderStop:
    """Checkpointed flag: a run resumed after dreambooth.text_encoder_steps keeps the text encoder frozen."""

    def __init__(self, method: "DreamBoothMethod"):
        self.method = method

    def state_dict(self) -> dict[str, bool]:
        return {"frozen": self.method.text_encoder_frozen}

    def load_state_dict(self, state: dict[str, bool]) -> None:
        if state.get("frozen"):
            self.method.freeze_text_encoder()


@contextmanager
def _eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Modules in eval mode for sampling, back in their previous mode after."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


class DreamBoothMethod(TrainingMethod):
    """Full fine-tune of the UNet (optionally the text encoder); exports a diffusers folder and a single file."""

    name = "dreambooth"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.settings: DreamBoothSettings = cfg.dreambooth or DreamBoothSettings()
        self.emas: dict[str, TrainingEMA] = {}
        self.text_encoder_frozen = False

    # -- setup --------------------------------------------------------------------------------
    def setup(self, models: BaseModel) -> None:
        super().setup(models)
        models.unet.requires_grad_(True)
        if self.settings.train_text_encoder:
            models.text_encoder.requires_grad_(True)

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        return self.unet_and_text_encoder(self.settings.train_text_encoder)

    def parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        groups = [{"params": list(self.models.unet.parameters()), "lr": learning_rate}]
        if self.settings.train_text_encoder:
            te_lr = self.settings.text_encoder_lr or learning_rate
            groups.append({"params": list(self.models.text_encoder.parameters()), "lr": te_lr})
        return groups

    def class_records(self, accelerator) -> list | None:
        """Class images from dreambooth.class_dir, the missing ones generated by the base model first."""
        s, m = self.settings, self.models
        if not s.prior_preservation:
            return None

        def make_pipeline():
            return build_pipeline(m.tokenizer, m.text_encoder, m.vae, m.unet, m.noise_scheduler)

        with _eval_mode(m.unet, m.text_encoder), accelerator.autocast():
            records, _ = prepare_class_images(
                accelerator, make_pipeline, s.class_dir, s.class_prompt, s.num_class_images,
                seed=self.cfg.train.seed, batch_size=s.class_generation_batch_size, steps=s.class_generation_steps,
                resolution=self.cfg.data.resolution, data=self.cfg.data,
            )
        return records

    def checkpoint_objects(self, accelerator) -> list[Any]:
        """Start the EMA copies here (models are on their device, fp32) and hand them to the checkpoints."""
        s = self.settings
        if s.ema:
            modules = self.trained_modules().items()
            self.emas = {name: self._make_ema(module, accelerator.device) for name, module in modules}
        return [*self.emas.values(), *([_TextEncoderStop(self)] if s.text_encoder_steps else [])]

    def _make_ema(self, module: torch.nn.Module, device: torch.device) -> TrainingEMA:
        s = self.settings
        return TrainingEMA(
            module.parameters(), every=s.ema_update_every, home=device, offload=s.ema_on_cpu,
            decay=s.ema_decay, update_after_step=s.ema_update_after_step,
            use_ema_warmup=s.ema_power is not None, power=s.ema_power or 2 / 3,
            # One fused update; its temporary fits in the gradient memory the loop freed (set_to_none).
            foreach=True,
        )

    def trainable_state_dict(self, module_name: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every weight of a trained module, the text encoder's too once it is frozen."""
        return {n: p.detach() for n, p in module.named_parameters()}

    # -- per step -----------------------------------------------------------------------------
    def encode_text(self, text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        if self.text_encoder_frozen:
            # The bare module without gradients: a DDP wrapper would wait for gradients that never come.
            with torch.no_grad():
                return self.models.text_encoder(input_ids, return_dict=False)[0]
        return super().encode_text(text_encoder, input_ids)

    def loss(self, per_sample: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Instance mean + prior_loss_weight x class mean; each term is logged on its own."""
        n = batch.get("num_instance")
        if n is None or n >= per_sample.shape[0]:
            return per_sample.mean(), {}
        instance, prior = per_sample[:n].mean(), per_sample[n:].mean()
        total = instance + self.settings.prior_loss_weight * prior
        return total, {"loss_instance": float(instance.detach()), "loss_prior": float(prior.detach())}

    def after_step(self, step: int) -> None:
        """Update the EMA copies, then stop the text encoder once dreambooth.text_encoder_steps is reached."""
        s, modules = self.settings, self.trained_modules()
        te_last = s.text_encoder_steps is not None and step == s.text_encoder_steps
        for name, ema in self.emas.items():
            due = step % s.ema_update_every == 0 or (name == "text_encoder" and te_last)
            if due and not (name == "text_encoder" and self.text_encoder_frozen):
                ema.update(step, modules[name].parameters())
        if s.text_encoder_steps is not None and step >= s.text_encoder_steps and not self.text_encoder_frozen:
            self.freeze_text_encoder()

    def freeze_text_encoder(self) -> None:
        """No more gradients for the text encoder: AdamW skips weights without one (no decay either).

        Its group's lr is left alone: the LR schedule rewrites every group's lr at each step anyway.
        """
        self.models.text_encoder.requires_grad_(False)
        self.text_encoder_frozen = True

    # -- weights to sample and export ---------------------------------------------------------
    @contextmanager
    def ema_weights(self, modules: dict[str, torch.nn.Module]) -> Iterator[None]:
        """The EMA averages swapped into ``modules`` (store + copy_to), the trained weights restored after."""
        swapped = [(ema, list(modules[name].parameters())) for name, ema in self.emas.items() if name in modules]
        for ema, params in swapped:
            ema.store(params)
            ema.copy_to(params)
        try:
            yield
        finally:
            for ema, params in swapped:
                ema.restore(params)

    def sampling_weights(self, modules: dict[str, torch.nn.Module]) -> AbstractContextManager:
        use_ema = self.emas and self.settings.use_ema_for != "raw"
        return self.ema_weights(modules) if use_ema else nullcontext()

    def export_weights(self, modules: dict[str, torch.nn.Module]) -> AbstractContextManager:
        # 'both' writes the raw file first and swaps the EMA in inside save().
        use_ema = self.emas and self.settings.use_ema_for == "ema"
        return self.ema_weights(modules) if use_ema else nullcontext()

    # -- export -------------------------------------------------------------------------------
    def save(self, final_dir: Path, modules: dict[str, torch.nn.Module], step: int) -> list[Path]:
        """final/diffusers (pipeline folder) + final/<name>.safetensors; with use_ema_for=both also <name>-raw."""
        final_dir.mkdir(parents=True, exist_ok=True)
        parts = self._export_parts(modules)
        name = self.cfg.output.name
        if not (self.emas and self.settings.use_ema_for == "both"):
            weights = "ema" if self.emas and self.settings.use_ema_for == "ema" else "raw"
            return [*self._save_pair(parts, final_dir, step, weights), *self._save_blends(parts, final_dir)]
        raw = self._save_single_file(parts, final_dir / f"{name}-raw.safetensors", step, "raw")
        with self.ema_weights(modules):
            return [*self._save_pair(parts, final_dir, step, "ema"), raw, *self._save_blends(parts, final_dir)]

    def _save_blends(self, parts: dict[str, Any], final_dir: Path) -> list[Path]:
        """``export.blend_alpha``: the exported weights averaged with the base, one single file per alpha."""
        alphas = self.cfg.export.blend_alpha or []
        if not alphas:
            return []
        from ..weights.blend import blend_with_base
        from ..weights.safetensors_io import save_safetensors
        from ..weights.single_file import diffusers_to_single_file

        base = self._pristine_base
        tuned = {name: parts[name].state_dict() for name in ("unet", "text_encoder")}
        base_unet, base_text, base_vae = (module.state_dict() for module in (base.unet, base.text_encoder, base.vae))
        paths = []
        for alpha in alphas:
            tensors = diffusers_to_single_file(
                blend_with_base(tuned["unet"], base_unet, alpha),
                base_vae,
                blend_with_base(tuned["text_encoder"], base_text, alpha),
                dict(base.unet.config),
                dict(base.vae.config),
                dtype=EXPORT_DTYPES[self.cfg.export.dtype],
            )
            metadata = {
                "modelspec.architecture": "stable-diffusion-v1",
                "modelspec.description": f"{alpha} x DreamBooth fine-tune + {1 - alpha:g} x {self.cfg.model.pretrained}",
                "dreamtune.blend_alpha": alpha,
                "dreamtune.base_model": self.cfg.model.pretrained,
            }
            path = final_dir / f"{self.cfg.output.name}-blend-{alpha:.2f}.safetensors"
            paths.append(save_safetensors(tensors, path, metadata=metadata))
        return paths

    @cached_property
    def _pristine_base(self) -> BaseModel:
        """The base as stored (fp32): what blends start from and what frozen parts export as; loaded once."""
        return load_base_model(self.cfg.model)

    def _export_parts(self, modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
        """Trained modules as they are; frozen ones as the base has them (not their half-precision copies)."""
        m = self.models
        parts = {"unet": modules["unet"], "text_encoder": modules.get("text_encoder", m.text_encoder),
                 "vae": m.vae, "tokenizer": m.tokenizer, "scheduler": self._base_scheduler()}
        if self.cfg.train.mixed_precision != "no":
            base = self._pristine_base
            parts["vae"] = base.vae
            if "text_encoder" not in modules:
                parts["text_encoder"] = base.text_encoder
        return parts

    def _base_scheduler(self):
        """The base model's own inference scheduler (class and settings) for the exported pipeline."""
        import diffusers

        model = self.cfg.model
        if Path(model.pretrained).expanduser().is_file():
            config = json.loads((SD1_CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())
        else:
            config = diffusers.DDPMScheduler.load_config(
                model.pretrained, subfolder="scheduler", revision=model.revision
            )
        cls = getattr(diffusers, str(config.get("_class_name")), None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
            cls = diffusers.PNDMScheduler
        scheduler = cls.from_config(config)
        if model.prediction_type:
            scheduler.register_to_config(prediction_type=model.prediction_type)
        return scheduler

    def _save_pair(self, parts: dict[str, Any], final_dir: Path, step: int, weights: str) -> list[Path]:
        """The diffusers pipeline folder (fp32, safetensors) and the single-file checkpoint."""
        from diffusers import StableDiffusionPipeline

        folder = final_dir / "diffusers"
        pipe = StableDiffusionPipeline(
            vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
            scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(folder, safe_serialization=True)
        single = self._save_single_file(parts, final_dir / f"{self.cfg.output.name}.safetensors", step, weights)
        return [folder, single]

    def _save_single_file(self, parts: dict[str, Any], path: Path, step: int, weights: str) -> Path:
        """One SD 1.x checkpoint in the original layout (what A1111, ComfyUI and InvokeAI load)."""
        cfg = self.cfg
        metadata = {
            "modelspec.description": f"DreamBooth fine-tune of {cfg.model.pretrained} ({step} steps, {weights} "
                                     "weights), made with dreamtune",
            "dreamtune.trainer": self.name,
            "dreamtune.base_model": cfg.model.pretrained,
            "dreamtune.steps": step,
            "dreamtune.weights": weights,
            "dreamtune.config": json.dumps(cfg.model_dump(mode="json")),
        }
        if self.trigger():
            metadata["modelspec.trigger_phrase"] = self.trigger()
        return save_single_file(parts, path, dtype=EXPORT_DTYPES[cfg.export.dtype], metadata=metadata)
