"""Textual Inversion exports: diffusers' learned_embeds.safetensors and the A1111 embedding UIs load."""

from __future__ import annotations

from pathlib import Path

import torch

from ...training.method import Exporter
from ...weights.embeddings import save_a1111_embedding, save_a1111_pt, save_diffusers_embedding

#: diffusers' own file name: ``load_textual_inversion(folder)`` finds it without ``weight_name``.
DIFFUSERS_FILE = "learned_embeds.safetensors"


class TextualInversionExporter(Exporter):
    def write(self, final_dir: Path, modules: dict[str, torch.nn.Module], step: int) -> list[Path]:
        """diffusers' learned_embeds.safetensors, the A1111 <name>.safetensors, and the .pt when asked."""
        vectors = self.method.learned_vectors(modules["text_encoder"])
        name, placeholder = self.cfg.output.name, self.cfg.textual_inversion.placeholder_token
        final_dir.mkdir(parents=True, exist_ok=True)
        paths = [
            save_diffusers_embedding(final_dir / DIFFUSERS_FILE, placeholder, vectors, metadata=self._metadata(step)),
            save_a1111_embedding(
                final_dir / f"{name}.safetensors", vectors, name=name, metadata=self._metadata(step, name)
            ),
        ]
        if self.cfg.textual_inversion.export_pt:
            paths.append(save_a1111_pt(final_dir / f"{name}.pt", vectors, name=name, step=step))
        return [Path(p) for p in paths]

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
pipe.load_textual_inversion("{final}")              # learned_embeds.safetensors; the word is {trigger}
# or the A1111 file, naming the word to type:
# pipe.load_textual_inversion("{final}/{name}.safetensors", token="{trigger}")
image = pipe("{self.example_prompt()}").images[0]
```

AUTOMATIC1111 / Forge: copy `final/{name}.safetensors` into the `embeddings/` folder; the file name is the
trigger, so write `{name}` in the prompt. ComfyUI: copy it into `models/embeddings/` and write
`embedding:{name}` in the prompt. InvokeAI: install `final/{name}.safetensors` from the model manager
(type Embedding) and type `<{name}>`."""
