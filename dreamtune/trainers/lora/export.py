"""LoRA exports: the kohya file UIs load (A1111, ComfyUI, InvokeAI), alone in final/, and diffusers' PEFT-format file."""

from __future__ import annotations

from pathlib import Path

import torch

from ...models.dtypes import dtype_of
from ...training.method import Exporter
from ...training.run_folder import RunFolder
from ...weights.lora_formats import kohya_metadata, lora_config_values, peft_to_kohya, save_diffusers_lora
from ...weights.safetensors_io import save_safetensors


def lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors in PEFT naming, fp32 on the CPU."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, save_embedding_layers=False)
    return {k: v.detach().float().cpu() for k, v in state.items()}


class LoraExporter(Exporter):
    def write(self, out: RunFolder, modules: dict[str, torch.nn.Module], step: int) -> list[Path]:
        lora = {part: lora_state(modules[part]) for part in ("unet", "text_encoder") if part in modules}
        configs = {part: modules[part].peft_config["default"] for part in lora}
        ranks, alphas = {}, {}
        for part, state in lora.items():
            part_ranks, part_alphas = lora_config_values(state, configs[part])
            ranks.update(part_ranks)
            alphas.update(part_alphas)
        dtype = dtype_of(self.cfg.export.dtype)
        kohya = peft_to_kohya(lora["unet"], lora.get("text_encoder"), rank=ranks, alpha=alphas)
        kohya = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kohya.items()}
        s, t = self.cfg.lora, self.cfg.train
        metadata = kohya_metadata(
            rank=s.rank,
            alpha=s.alpha,
            title=self.cfg.output.name,
            output_name=self.cfg.output.name,
            steps=step,
            seed=t.seed,
            resolution=self.cfg.data.resolution,
            trigger_phrase=self.trigger(),
            base_model=self.cfg.model.pretrained,
            learning_rate=t.learning_rate,
            unet_lr=t.learning_rate,
            text_encoder_lr=(s.text_encoder_lr or t.learning_rate) if s.train_text_encoder else None,
            training_comment="trained with dreamtune",
            tensors=kohya,
        )
        out.final.mkdir(parents=True, exist_ok=True)
        kohya_path = save_safetensors(kohya, out.final / f"{self.cfg.output.name}.safetensors", metadata=metadata)
        # Neither UI reads the PEFT layout (ComfyUI applies only its text-encoder keys; InvokeAI: unknown).
        out.diffusers.mkdir(parents=True, exist_ok=True)
        diffusers_path = save_diffusers_lora(
            out.diffusers,
            lora["unet"],
            lora.get("text_encoder"),
            unet_lora_config=configs["unet"],
            text_encoder_lora_config=configs.get("text_encoder"),
            metadata={k: v for k, v in metadata.items() if not k.startswith(("sshs_", "modelspec.hash"))},
        )
        return [Path(kohya_path), Path(diffusers_path)]

    def ui_file(self, files: list[Path]) -> Path | None:
        return files[0]

    def usage(self, final: Path, files: list[Path]) -> str:
        name, base, prompt = self.cfg.output.name, self.cfg.model.pretrained, self.example_prompt()
        return f"""```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("{self.run.diffusers}")                     # the diffusers/PEFT file
# or: pipe.load_lora_weights("{final}", weight_name="{name}.safetensors")  # the kohya file
image = pipe("{prompt}").images[0]
```

**For UIs use `final/{name}.safetensors`** (kohya format; the only file in `final/`).
AUTOMATIC1111 / Forge: copy it into `models/Lora/` and write `<lora:{name}:1>` in the prompt.
ComfyUI: copy it into `models/loras/` and use a *LoraLoader* node. InvokeAI: install the file (or the
`final/` folder) from the model manager (type LoRA). `diffusers/pytorch_lora_weights.safetensors` is for
diffusers code only: ComfyUI applies just its text-encoder part and InvokeAI does not recognise it."""
