"""Textual Inversion exports: the A1111 embedding UIs load, alone in final/, and diffusers' learned_embeds.safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from ...training.method import Exporter
from ...weights.embeddings import save_a1111_embedding, save_a1111_pt, save_diffusers_embedding

#: diffusers' own file name: ``load_textual_inversion(folder)`` finds it without ``weight_name``.
DIFFUSERS_FILE = "learned_embeds.safetensors"


class TextualInversionExporter(Exporter):
    def write(self, final_dir: Path, modules: dict[str, torch.nn.Module], step: int) -> list[Path]:
        """final/<name>.safetensors (A1111), diffusers/learned_embeds.safetensors, and variants/<name>.pt when asked.

        Only the A1111 file sits in final/: InvokeAI classifies a folder by whichever of its weight files it
        meets first, and reads a multi-vector ``{token: [n, 768]}`` file as unknown.
        """
        vectors = self.method.learned_vectors(modules["text_encoder"])
        name, placeholder = self.cfg.output.name, self.cfg.textual_inversion.placeholder_token
        final_dir.mkdir(parents=True, exist_ok=True)
        self.run.diffusers.mkdir(parents=True, exist_ok=True)
        paths = [
            save_a1111_embedding(
                final_dir / f"{name}.safetensors", vectors, name=name, metadata=self._metadata(step, name)
            ),
            save_diffusers_embedding(self.run.diffusers / DIFFUSERS_FILE, placeholder, vectors,
                                     metadata=self._metadata(step)),
        ]
        if self.cfg.textual_inversion.export_pt:
            self.run.variants.mkdir(parents=True, exist_ok=True)
            paths.append(save_a1111_pt(self.run.variants / f"{name}.pt", vectors, name=name, step=step))
        return [Path(p) for p in paths]

    def ui_file(self, files: list[Path]) -> Path | None:
        return files[0]

    def _metadata(self, step: int, trigger: str | None = None) -> dict[str, str]:
        """What the file is and how to call it up, in model-spec keys UIs display."""
        s, resolution = self.cfg.textual_inversion, self.cfg.data.resolution
        return {
            "modelspec.trigger_phrase": trigger or s.placeholder_token,
            "modelspec.resolution": f"{resolution}x{resolution}",
            "modelspec.description": (
                f"textual inversion of {s.placeholder_token} ({s.num_vectors} vectors from "
                f"{s.initializer_token!r}, {s.learnable_property}) on {self.cfg.model.pretrained}, {step} steps"
            ),
        }

    def trigger(self) -> str | None:
        return self.cfg.textual_inversion.placeholder_token

    def example_prompt(self) -> str:
        return f"a photo of {self.trigger()}"

    def usage(self, final: Path, files: list[Path]) -> str:
        name, base, trigger = self.cfg.output.name, self.cfg.model.pretrained, self.trigger()
        return f"""```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{base}")
pipe.load_textual_inversion("{self.run.diffusers}")   # learned_embeds.safetensors; the word is {trigger}
# or the A1111 file, naming the word to type:
# pipe.load_textual_inversion("{final}/{name}.safetensors", token="{trigger}")
image = pipe("{self.example_prompt()}").images[0]
```

**For UIs use `final/{name}.safetensors`** (A1111 format; the only file in `final/`).
AUTOMATIC1111 / Forge: copy it into the `embeddings/` folder; the file name is the trigger, so write
`{name}` in the prompt. ComfyUI: copy it into `models/embeddings/` and write `embedding:{name}` in the
prompt. InvokeAI: install the file (or the `final/` folder) from the model manager (type Embedding) and
type `<{name}>`. `diffusers/learned_embeds.safetensors` is for diffusers code."""
