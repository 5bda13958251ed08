"""The toy-world benchmark's exports, loaded from the files a run wrote, as a user would load them."""

from __future__ import annotations

from pathlib import Path

def load_base(model_dir: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        str(model_dir), safety_checker=None, requires_safety_checker=False, use_safetensors=True)


#: The diffusers-format file of each kind of export (in the run's diffusers/ folder), as diffusers users load it.
LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDING_FILE = "learned_embeds.safetensors"


def _diffusers_dir(final: Path) -> Path:
    """The run's diffusers-format exports, beside its final/ folder."""
    from ..training.run_folder import RunFolder

    return RunFolder(final.parent).diffusers


def export_kind(entry: str, final: Path) -> str:
    """What a run exported, read from its files: "pipeline" (a full model), "pivotal" (a LoRA and the new
    words' ``clip_l`` embedding), "lora" or "embedding"."""
    if not final.is_dir():
        raise FileNotFoundError(f"{final}: the {entry} run wrote no final export")
    folder = _diffusers_dir(final)
    if (folder / "model_index.json").is_file():
        return "pipeline"
    if _pivotal_embedding(folder) is not None:
        return "pivotal"
    if (folder / LORA_FILE).is_file() or ui_lora_file(final) is not None:
        return "lora"
    if (folder / EMBEDDING_FILE).is_file():
        return "embedding"
    raise FileNotFoundError(f"{folder}: the {entry} run exported no diffusers model, {LORA_FILE} or {EMBEDDING_FILE}")


def ui_lora_file(final: Path) -> Path | None:
    """The kohya/LyCORIS file of a LoRA-family export (``lora_unet_*`` keys), the one A1111/ComfyUI load; else None."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(final.glob("*.safetensors")):
        if path.name in (LORA_FILE, EMBEDDING_FILE):
            continue
        try:
            with safe_open(str(path), "pt") as f:
                if any(k.startswith("lora_unet_") for k in f.keys()):
                    return path
        except SafetensorError:  # not a safetensors file at all: not the UI file either
            continue
    return None


def _merged_ui_file(model_dir: Path, ui_file: Path, out: Path):
    """The UI file applied to the base as A1111/ComfyUI patch weights: `dreamtune merge-lora`, then loaded."""
    from diffusers import StableDiffusionPipeline

    from ..cli import main

    if main(["merge-lora", str(model_dir), "--lora", str(ui_file), "--out", str(out), "--format", "diffusers",
             "--no-hash"]) != 0:
        raise RuntimeError(f"merge-lora could not bake {ui_file} into {model_dir}")
    return StableDiffusionPipeline.from_pretrained(
        str(out), safety_checker=None, requires_safety_checker=False, use_safetensors=True)


def load_export(entry: str, model_dir: Path, final: Path):
    """The trained pipeline, built from the exported files only (as a user would load them).

    A LoRA-family export is loaded from its UI file through `dreamtune merge-lora`: A1111 and ComfyUI
    patch the weights the same way, and diffusers loads neither LoHa, LoKr nor input-axis DoRA.
    """
    from diffusers import StableDiffusionPipeline

    kind, folder = export_kind(entry, final), _diffusers_dir(final)
    if kind == "pipeline":
        return StableDiffusionPipeline.from_pretrained(
            str(folder), safety_checker=None, requires_safety_checker=False, use_safetensors=True)
    if kind == "pivotal":
        return _pivotal_pipeline(model_dir, final)
    ui_file = ui_lora_file(final) if kind == "lora" else None
    if ui_file is not None:
        return _merged_ui_file(model_dir, ui_file, final.parent / "merged-ui")
    pipe = load_base(model_dir)
    if kind == "lora":
        pipe.load_lora_weights(str(folder), weight_name=LORA_FILE)
    else:
        pipe.load_textual_inversion(str(folder / EMBEDDING_FILE))
    return pipe



def export_size(entry: str, final: Path) -> int:
    """Bytes of the file a user would share: the one in final/ (single-file checkpoint, kohya LoRA or embedding)."""
    export_kind(entry, final)
    return max(p.stat().st_size for p in final.glob("*.safetensors"))




def _pivotal_embedding(folder: Path) -> Path | None:
    """The advanced script's ``<name>_emb.safetensors`` (``clip_l``) in a run's diffusers/ folder, if any."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*_emb.safetensors")):
        with safe_open(str(path), "pt") as f:
            if list(f.keys()) == ["clip_l"]:
                return path
    return None


def _pivotal_pipeline(model_dir: Path, final: Path):
    """The model card's lines: the diffusers LoRA file (or, for LoHa/LoKr/DoRA, the LoRA file baked in by
    merge-lora), then the ``clip_l`` vectors under the run's words."""
    import yaml
    from safetensors.torch import load_file

    from ..trainers.pivotal.settings import PivotalSettings

    run, folder = final.parent, _diffusers_dir(final)
    words = PivotalSettings(**yaml.safe_load((run / "config.yaml").read_text())["pivotal"]).words
    if (folder / LORA_FILE).is_file():
        pipe = load_base(model_dir)
        pipe.load_lora_weights(str(folder), weight_name=LORA_FILE)
    else:
        [lora] = sorted((run / "variants" / "lora").glob("*.safetensors"))
        pipe = _merged_ui_file(model_dir, lora, run / "merged-ui")
    state_dict = load_file(str(_pivotal_embedding(folder)))
    pipe.load_textual_inversion(state_dict["clip_l"], token=words, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    return pipe
