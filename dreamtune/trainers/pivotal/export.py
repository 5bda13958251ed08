"""Pivotal exports: the adapter and the new words' vectors in the files each tool loads without hand work.

- final/<name>.safetensors: the kohya/LyCORIS LoRA with the embedding bundled (``bundle_emb.<name>.*``), for
  A1111/Forge; ``<name>`` is the word to type there.
- variants/lora/<name>.safetensors and variants/embedding/<name>.safetensors (A1111 ``emb_params``): the two
  halves apart, for ComfyUI and InvokeAI (and A1111 when preferred); one weight file per folder, as InvokeAI asks.
- diffusers/pytorch_lora_weights.safetensors (plain LoRA/LoCon) and diffusers/<name>_emb.safetensors
  (``clip_l``), the layout of diffusers' advanced DreamBooth-LoRA script.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...training.run_folder import RunFolder
from ...weights.embeddings import bundle_tensors, save_a1111_embedding, save_clip_l_embedding
from ...weights.safetensors_io import save_safetensors
from ..lora.export import LoraExporter


class PivotalExporter(LoraExporter):
    def write(self, out: RunFolder, modules: dict[str, torch.nn.Module], step: int) -> list[Path]:
        name = self.cfg.output.name
        vectors = self.method.rows.vectors(modules["text_encoder"])
        adapters = self.adapters(modules)
        bundled, bundled_meta = self.kohya_file(adapters, step, bundle=bundle_tensors(name, vectors))
        kohya, metadata = self.kohya_file(adapters, step)
        ui_meta = {**metadata, "modelspec.trigger_phrase": name}
        for folder in (out.final, out.variants / "lora", out.variants / "embedding", out.diffusers):
            folder.mkdir(parents=True, exist_ok=True)
        files = [
            save_safetensors(bundled, out.final / f"{name}.safetensors",
                             metadata={**bundled_meta, "modelspec.trigger_phrase": name}),
            save_safetensors(kohya, out.variants / "lora" / f"{name}.safetensors", metadata=ui_meta),
            save_a1111_embedding(out.variants / "embedding" / f"{name}.safetensors", vectors, name=name,
                                 metadata=self._embedding_metadata(step, name)),
        ]
        if self.cfg.lora.type == "lora":
            files.append(self.write_diffusers(out, adapters, metadata))
        files.append(save_clip_l_embedding(out.diffusers / self.embedding_file(), vectors,
                                           metadata=self._embedding_metadata(step, self.cfg.pivotal.phrase)))
        return [Path(f) for f in files]

    def embedding_file(self) -> str:
        """The advanced script's name for the diffusers embedding file."""
        return f"{self.cfg.output.name}_emb.safetensors"

    def _embedding_metadata(self, step: int, trigger: str) -> dict[str, str]:
        p, resolution = self.cfg.pivotal, self.cfg.data.resolution
        return {
            "modelspec.trigger_phrase": trigger,
            "modelspec.resolution": f"{resolution}x{resolution}",
            "modelspec.description": (
                f"pivotal tuning: the {p.num_vectors} vectors of {p.phrase}, trained with the LoRA "
                f"{self.cfg.output.name} on {self.cfg.model.pretrained}, {step} steps; load both"
            ),
        }

    def ui_file(self, files: list[Path]) -> Path | None:
        return files[0]

    def for_uis(self, ui: str) -> str:
        name = self.cfg.output.name
        return (f"- For AUTOMATIC1111/Forge: `{ui}` (the LoRA with the embedding bundled); for ComfyUI and InvokeAI: "
                f"`variants/lora/{name}.safetensors` and `variants/embedding/{name}.safetensors`\n")

    def usage(self, final: Path, files: list[Path]) -> str:
        name, base, prompt = self.cfg.output.name, self.cfg.model.pretrained, self.example_prompt()
        words, phrase, diffusers = self.cfg.pivotal.words, self.cfg.pivotal.phrase, self.run.diffusers
        ui_prompt = prompt.replace(phrase, name)
        variants = self.run.variants
        if self.cfg.lora.type == "lora":
            lora = f'pipe.load_lora_weights("{diffusers}", weight_name="pytorch_lora_weights.safetensors")'
            pipe = f'pipe = StableDiffusionPipeline.from_pretrained("{base}")\n{lora}'
        else:  # diffusers loads no LoHa/LoKr/input-axis DoRA for SD 1.x: bake the adapter in first
            pipe = (f"# first: dreamtune merge-lora {base} --lora {variants}/lora/{name}.safetensors:1.0 "
                    f"--out merged --format diffusers\npipe = StableDiffusionPipeline.from_pretrained(\"merged\")")
        return f"""The LoRA and the new words were trained together: load both.

```python
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
{pipe}
state_dict = load_file("{diffusers}/{self.embedding_file()}")
pipe.load_textual_inversion(state_dict["clip_l"], token={words!r}, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
image = pipe("{prompt}").images[0]
```

**AUTOMATIC1111 / Forge: use `final/{name}.safetensors`** (the LoRA with the embedding bundled in; the only file
in `final/`). Copy it into `models/Lora/` and prompt `{ui_prompt} <lora:{name}:1>`: the bundled embedding is
the word `{name}`. Or copy `variants/lora/{name}.safetensors` into `models/Lora/` and
`variants/embedding/{name}.safetensors` into `embeddings/`, same prompt.
ComfyUI: copy `variants/lora/{name}.safetensors` into `models/loras/` (a *LoraLoader* node) and
`variants/embedding/{name}.safetensors` into `models/embeddings/`, and prompt `{prompt.replace(phrase, f"embedding:{name}")}`.
InvokeAI: install `variants/lora/` (type LoRA) and `variants/embedding/` (type Embedding) from the model
manager, and prompt `{prompt.replace(phrase, f"<{name}>")}` with the LoRA enabled."""
