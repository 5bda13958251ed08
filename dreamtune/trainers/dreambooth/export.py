"""DreamBooth exports: the single-file checkpoint UIs load (alone in final/), a diffusers pipeline folder, blends."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ...models.dtypes import dtype_of
from ...models.loading import BaseModel, load_base_model
from ...models.pipeline import build_pipeline, resolve_scheduler, with_zero_terminal_snr
from ...training.method import Exporter
from ...training.run_folder import RunFolder
from ...weights.blend import blend_with_base
from ...weights.safetensors_io import save_safetensors
from ...weights.diffusers_folder import SD1_CONFIG_DIR, save_pipeline_folder
from ...weights.single_file import diffusers_to_single_file, save_single_file


class DreamBoothExporter(Exporter):
    def write(self, out: RunFolder, modules: dict[str, torch.nn.Module], step: int) -> list[Path]:
        """final/<name>.safetensors + diffusers/ (pipeline folder); variants/<name>-raw (use_ema_for=both) and blends."""
        out.final.mkdir(parents=True, exist_ok=True)
        parts = self._export_parts(modules)
        name, emas, choice = self.cfg.output.name, self.method.emas, self.cfg.dreambooth.use_ema_for
        if not (emas and choice == "both"):
            weights = "ema" if emas and choice == "ema" else "raw"
            return [*self._save_pair(parts, out, step, weights), *self._save_blends(parts, out)]
        out.variants.mkdir(parents=True, exist_ok=True)
        raw = self._save_single_file(parts, out.variants / f"{name}-raw.safetensors", step, "raw")
        with self.method.ema_weights(modules):
            return [*self._save_pair(parts, out, step, "ema"), raw, *self._save_blends(parts, out)]

    def ui_file(self, files: list[Path]) -> Path | None:
        return files[0]

    def _save_blends(self, parts: dict[str, Any], out: RunFolder) -> list[Path]:
        """``export.blend_alpha``: the exported weights averaged with the base, one single file per alpha."""
        alphas = self.cfg.export.blend_alpha or []
        if not alphas:
            return []
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
                dtype=dtype_of(self.cfg.export.dtype),
            )
            metadata = {
                "modelspec.architecture": "stable-diffusion-v1",
                "modelspec.description": f"{alpha} x DreamBooth fine-tune + {1 - alpha:g} x {self.cfg.model.pretrained}",
                "dreamtune.blend_alpha": alpha,
                "dreamtune.base_model": self.cfg.model.pretrained,
            }
            out.variants.mkdir(parents=True, exist_ok=True)
            path = out.variants / f"{self.cfg.output.name}-blend-{alpha:.2f}.safetensors"
            paths.append(save_safetensors(tensors, path, metadata=metadata))
        return paths

    @cached_property
    def _pristine_base(self) -> BaseModel:
        """The base as stored (fp32): what blends start from and what frozen parts export as; loaded once."""
        return load_base_model(self.cfg.model)

    def _export_parts(self, modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
        """Trained modules as they are; frozen ones as the base has them (not their half-precision copies)."""
        m = self.method.models
        parts = {"unet": modules["unet"], "text_encoder": modules.get("text_encoder", m.text_encoder),
                 "vae": m.vae, "tokenizer": m.tokenizer, "scheduler": self._base_scheduler()}
        if self.cfg.train.mixed_precision != "no":
            base = self._pristine_base
            parts["vae"] = base.vae.float()  # a base stored in half precision still exports an fp32 folder
            if "text_encoder" not in modules:
                parts["text_encoder"] = base.text_encoder.float()
        return parts

    def _base_scheduler(self):
        """The base model's own inference scheduler (class and settings) for the exported pipeline."""
        import diffusers

        model = self.cfg.model
        if Path(model.pretrained).expanduser().is_file():  # a single file carries no scheduler: SD 1.x's own
            config = json.loads((SD1_CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())
        else:
            config = diffusers.DDPMScheduler.load_config(
                model.pretrained, subfolder="scheduler", revision=model.revision
            )
        scheduler = resolve_scheduler(config)
        if model.prediction_type:
            scheduler.register_to_config(prediction_type=model.prediction_type)
        return with_zero_terminal_snr(scheduler) if self.cfg.train.zero_terminal_snr else scheduler

    def _save_pair(self, parts: dict[str, Any], out: RunFolder, step: int, weights: str) -> list[Path]:
        """The single-file checkpoint and the diffusers pipeline folder (fp32, safetensors, the hub's key layout)."""
        single = self._save_single_file(parts, out.final / f"{self.cfg.output.name}.safetensors", step, weights)
        pipe = build_pipeline(parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["unet"], parts["scheduler"])
        folder = save_pipeline_folder(pipe, out.diffusers)
        return [single, folder]

    def _save_single_file(self, parts: dict[str, Any], path: Path, step: int, weights: str) -> Path:
        """One SD 1.x checkpoint in the original layout (what A1111, ComfyUI and InvokeAI load)."""
        cfg = self.cfg
        metadata = {
            "modelspec.description": f"DreamBooth fine-tune of {cfg.model.pretrained} ({step} steps, {weights} "
                                     "weights), made with dreamtune",
            "dreamtune.trainer": self.method.name,
            "dreamtune.base_model": cfg.model.pretrained,
            "dreamtune.steps": step,
            "dreamtune.weights": weights,
            "dreamtune.config": json.dumps(cfg.model_dump(mode="json")),
        }
        if self.trigger():
            metadata["modelspec.trigger_phrase"] = self.trigger()
        return save_single_file(parts, path, dtype=dtype_of(cfg.export.dtype), metadata=metadata)

    def usage(self, final: Path, files: list[Path]) -> str:
        name, prompt = self.cfg.output.name, self.example_prompt()
        return f"""```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{self.run.diffusers}")       # the diffusers folder
# or: pipe = StableDiffusionPipeline.from_single_file("{final}/{name}.safetensors")
image = pipe("{prompt}").images[0]
```

**For UIs use `final/{name}.safetensors`**, a complete checkpoint in the original Stable Diffusion layout
and the only file in `final/`. AUTOMATIC1111 / Forge: copy it into `models/Stable-diffusion/` and pick it
as the checkpoint. ComfyUI: copy it into `models/checkpoints/` and use a *Load Checkpoint* node.
InvokeAI: install the file (or the `diffusers/` folder) from the model manager (type Main).
With `dreambooth.use_ema_for: both`, `variants/{name}-raw.safetensors` holds the weights without EMA;
`export.blend_alpha` writes `variants/{name}-blend-<alpha>.safetensors`."""
