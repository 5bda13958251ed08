"""The run's README.md: what was trained, from what, and how to load each exported file."""

from __future__ import annotations

from pathlib import Path

from .config import RunConfig

_LOAD = {
    "dreambooth": """```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{final}/diffusers")       # the diffusers folder
# or: pipe = StableDiffusionPipeline.from_single_file("{final}/{name}.safetensors")
image = pipe("{trigger}").images[0]
```

`final/{name}.safetensors` is a complete checkpoint in the original Stable Diffusion layout.
AUTOMATIC1111 / Forge: copy it into `models/Stable-diffusion/` and pick it as the checkpoint.
ComfyUI: copy it into `models/checkpoints/` and use a *Load Checkpoint* node. InvokeAI: install
`final/{name}.safetensors` (or the `final/diffusers` folder) from the model manager (type Main).
With `dreambooth.use_ema_for: both`, `final/{name}-raw.safetensors` holds the weights without EMA.""",
    "lora": """```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("{final}")                                   # the diffusers/PEFT file
# or: pipe.load_lora_weights("{final}", weight_name="{name}.safetensors")  # the kohya file
image = pipe("{trigger}").images[0]
```

AUTOMATIC1111 / Forge: copy `final/{name}.safetensors` into `models/Lora/` and write
`<lora:{name}:1>` in the prompt. ComfyUI: copy it into `models/loras/` and use a *LoraLoader* node.
InvokeAI: install `final/{name}.safetensors` from the model manager (type LoRA).""",
    "textual_inversion": """```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{base}")
pipe.load_textual_inversion("{final}")              # learned_embeds.safetensors; the word is {trigger}
# or the A1111 file, naming the word to type:
# pipe.load_textual_inversion("{final}/{name}.safetensors", token="{trigger}")
image = pipe("a photo of {trigger}").images[0]
```

AUTOMATIC1111 / Forge: copy `final/{name}.safetensors` into the `embeddings/` folder; the file name is the
trigger, so write `{name}` in the prompt. ComfyUI: copy it into `models/embeddings/` and write
`embedding:{name}` in the prompt. InvokeAI: install `final/{name}.safetensors` from the model manager
(type Embedding) and type `<{name}>`.""",
}


def write_model_card(path: Path, cfg: RunConfig, method, exported: list[Path], step: int) -> Path:
    """Write the model card; it repeats the settings a user needs to reproduce or use the result."""
    final = path.parent / "final"
    trigger = method.trigger() or "(none: the model's style applies to any prompt)"
    how = _LOAD.get(cfg.trainer, "").format(
        base=cfg.model.pretrained, final=final, name=cfg.output.name, trigger=method.trigger() or "a photo"
    )
    files = "\n".join(f"- `{p.relative_to(path.parent)}`" for p in exported)
    t = cfg.train
    settings = (
        f"steps {step}, batch {t.batch_size} x accumulation {t.gradient_accumulation}, learning rate "
        f"{t.learning_rate} ({t.lr_scheduler}, warmup {t.lr_warmup_steps}), optimizer {t.optimizer}, "
        f"precision {t.mixed_precision}, resolution {cfg.data.resolution}, seed {t.seed}"
    )
    if cfg.trainer == "lora" and cfg.lora:
        settings += f", rank {cfg.lora.rank}, alpha {cfg.lora.alpha}, targets {', '.join(cfg.lora.target_modules)}"
    path.write_text(
        f"# {cfg.output.name}\n\n"
        f"A **{cfg.trainer}** fine-tune of `{cfg.model.pretrained}` made with dreamtune.\n\n"
        f"- Trigger: `{trigger}`\n- Settings: {settings}\n- Full config: `config.yaml`\n\n"
        f"## Files\n\n{files}\n\n## How to use it\n\n{how}\n"
    )
    return path
