"""LoRA-family exports: the kohya/LyCORIS file UIs load (A1111, ComfyUI, InvokeAI), alone in final/, and for
plain LoRA and LoCon diffusers' PEFT-format file (diffusers loads no input-axis DoRA, LoHa or LoKr file for SD 1.x)."""

from __future__ import annotations

from pathlib import Path

from ...models.dtypes import dtype_of
from ...models.text import kohya_text_metadata
from ...training.method import Exporter
from ...training.run_folder import RunFolder
from ...weights.lora_formats import kohya_metadata, most_common, save_diffusers_lora
from ...weights.lycoris_formats import AdapterFile, lora_peft_state, network_metadata, to_kohya_tensors
from ...weights.safetensors_io import save_safetensors
from .family import adapter_modules


class LoraExporter(Exporter):
    def write(self, out: RunFolder, modules: dict, step: int) -> list[Path]:
        adapters = self.adapters(modules)
        kohya, metadata = self.kohya_file(adapters, step)
        out.final.mkdir(parents=True, exist_ok=True)
        files = [Path(save_safetensors(kohya, out.final / f"{self.cfg.output.name}.safetensors", metadata=metadata))]
        if self.cfg.lora.type == "lora":
            files.append(self.write_diffusers(out, adapters, metadata))
        return files

    def adapters(self, modules: dict) -> AdapterFile:
        """The trained adapters of ``modules``, relative to the base as loaded."""
        return AdapterFile(**{part: adapter_modules(modules[part], self.method.initial.get(part))
                              for part in ("unet", "text_encoder") if part in modules})

    def kohya_file(self, adapters: AdapterFile, step: int, bundle: dict | None = None) -> tuple[dict, dict[str, str]]:
        """The kohya/LyCORIS tensors (in export.dtype, plus ``bundle`` as given) and the ``ss_*``/model-spec
        metadata UIs show (its hashes cover every tensor)."""
        dtype = dtype_of(self.cfg.export.dtype)
        kohya = {k: (v.to(dtype) if v.dim() else v) for k, v in to_kohya_tensors(adapters).items()}
        kohya.update(bundle or {})
        s, t = self.cfg.lora, self.cfg.train
        every = [m for _, _, m in adapters.parts()]
        metadata = kohya_metadata(
            rank=int(most_common(m.rank() or s.rank for m in every)),
            alpha=float(most_common(m.alpha for m in every)),
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
            extra={**network_metadata(s.type, s.conv_rank, s.conv_alpha, self._network_args()),
                   **kohya_text_metadata(self.cfg.model.clip_skip, self.cfg.data.max_token_length)},
        )
        return kohya, metadata

    def write_diffusers(self, out: RunFolder, adapters: AdapterFile, metadata: dict[str, str]) -> Path:
        """diffusers/pytorch_lora_weights.safetensors (PEFT layout; plain LoRA/LoCon only).

        Neither UI reads the PEFT layout (ComfyUI applies only its text-encoder keys; InvokeAI: unknown)."""
        out.diffusers.mkdir(parents=True, exist_ok=True)
        return Path(save_diffusers_lora(
            out.diffusers,
            lora_peft_state(adapters.unet),
            lora_peft_state(adapters.text_encoder) or None,
            metadata={k: v for k, v in metadata.items() if not k.startswith(("sshs_", "modelspec.hash"))},
        ))

    def ui_file(self, files: list[Path]) -> Path | None:
        return files[0]

    def _network_args(self) -> dict[str, object]:
        """The training options kohya/LyCORIS record in ss_network_args, where set."""
        s = self.cfg.lora
        args = {"rank_dropout": s.rank_dropout or None, "module_dropout": s.module_dropout or None,
                "dropout": s.dropout or None, "rs_lora": s.rslora or None,
                "init": s.init if s.init != "gaussian" else None, "loraplus_lr_ratio": s.plus_ratio}
        return {k: v for k, v in args.items() if v is not None}

    def usage(self, final: Path, files: list[Path]) -> str:
        name, base, prompt = self.cfg.output.name, self.cfg.model.pretrained, self.example_prompt()
        uis = f"""**For UIs use `final/{name}.safetensors`** (kohya/LyCORIS format; the only file in `final/`).
AUTOMATIC1111 / Forge: copy it into `models/Lora/` and write `<lora:{name}:1>` in the prompt.
ComfyUI: copy it into `models/loras/` and use a *LoraLoader* node. InvokeAI: install the file (or the
`final/` folder) from the model manager (type LoRA)."""
        if self.cfg.lora.type != "lora":
            return f"""diffusers cannot load a {self.cfg.lora.type} file for SD 1.x; bake it into the base instead:

```bash
dreamtune merge-lora {base} --lora {final}/{name}.safetensors:1.0 --out merged --format diffusers
```

{uis}"""
        return f"""```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("{self.run.diffusers}")                     # the diffusers/PEFT file
# or: pipe.load_lora_weights("{final}", weight_name="{name}.safetensors")  # the kohya file
image = pipe("{prompt}").images[0]
```

{uis} `diffusers/pytorch_lora_weights.safetensors` is for diffusers code only: ComfyUI applies just its
text-encoder part and InvokeAI does not recognise it."""
