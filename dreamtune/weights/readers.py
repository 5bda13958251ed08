"""Which tools load a weight file or diffusers folder, by the rules ComfyUI 0.3.64 and InvokeAI 6.14.2 apply.

The verdicts follow their loaders' key maps and detection rules (and what they did with our exports):
UIs read the kohya LoRA, the A1111 embedding and the SD 1.x single file; diffusers-format files are for
diffusers code. ``"yes"`` or ``"no: <why>"`` / ``"partly: <what>"`` per tool; tools a file was not checked
against are left out.
"""

from __future__ import annotations

from typing import Any

DIFFUSERS, A1111, COMFYUI, INVOKEAI = "diffusers", "AUTOMATIC1111/Forge", "ComfyUI", "InvokeAI"
#: SD 1.x's text width (CLIP ViT-L/14): what InvokeAI reads from a LoRA or embedding to call it SD 1.x.
SD1_WIDTH = 768

Header = dict[str, tuple[tuple[int, ...], str]]


def _width_verdict(width: int | None, what: str) -> str:
    """InvokeAI files a LoRA or embedding under a base by its text width; an unknown width is 'unknown'."""
    if width == SD1_WIDTH:
        return "yes"
    return f"no: it reads the {what} as {width} wide, not SD 1.x's {SD1_WIDTH}, and calls the file unknown"


def _kohya_width(header: Header) -> int | None:
    """InvokeAI's rule: input width of a UNet attn2 to_k/to_v or a text-encoder self_attn ``lora_down``."""
    for key, (shape, _) in header.items():
        cross = key.startswith("lora_unet_") and ("_attn2_to_k." in key or "_attn2_to_v." in key)
        text = key.startswith("lora_te_") and "_self_attn_" in key
        if (cross or text) and key.endswith(".lora_down.weight") and len(shape) >= 2:
            return shape[1]
    return None


def lora_readers(layout: str, header: Header) -> dict[str, str]:
    from .lycoris_formats import is_lycoris

    if layout == "kohya" and is_lycoris(header):  # LoHa/LoKr/DoRA (InvokeAI's reading was not checked)
        return {DIFFUSERS: "no: it loads no LoHa, LoKr or input-axis DoRA for SD 1.x; bake it with "
                           "`dreamtune merge-lora`",
                A1111: "yes (network_hada/network_lokr, dora_scale)", COMFYUI: "yes (weight_adapter loha/lokr/lora)"}
    if layout == "kohya":
        return {DIFFUSERS: "yes (load_lora_weights with weight_name)", A1111: "yes", COMFYUI: "yes",
                INVOKEAI: _width_verdict(_kohya_width(header), "text width")}
    if layout == "diffusers":
        return {
            DIFFUSERS: "yes",
            A1111: "no: it reads kohya keys (lora_unet_*, lora_te_*)",
            COMFYUI: "partly: applies only the text_encoder.* keys and skips every unet.* key "
                     "('lora key not loaded'); use the kohya file",
            INVOKEAI: "no: the PEFT layout is not recognised (unknown); use the kohya file",
        }
    return {}


def bundled_readers(names: list[str]) -> dict[str, str]:
    """A kohya file with embeddings bundled in (``bundle_emb.<name>.*``, pivotal tuning): A1111 loads both."""
    words = ", ".join(names)
    return {
        DIFFUSERS: "no: load_lora_weights refuses the bundle_emb keys ('Invalid LoRA checkpoint'); load the "
                   "separate LoRA and embedding files",
        A1111: f"yes (the LoRA and its bundled embedding; type {words} in the prompt)",
        COMFYUI: "partly: the LoRA loads; its loader skips the bundle_emb keys ('lora key not loaded'), so load "
                 "the separate embedding file",
    }


def embedding_readers(layout: str, header: Header) -> dict[str, str]:
    (shape, _), = header.values()
    if layout == "a1111":
        return {DIFFUSERS: "yes (load_textual_inversion with token=)", A1111: "yes", COMFYUI: "yes",
                INVOKEAI: _width_verdict(shape[-1], "embedding")}
    if layout == "clip_l":  # diffusers' advanced script for SD 1.5; the words are not stored
        return {DIFFUSERS: 'yes (load_textual_inversion(state_dict["clip_l"], token=[one word per vector]))'}
    if layout == "diffusers":
        # InvokeAI takes shape[0] of a {token: tensor} file for the width: [n, 768] reads as n wide.
        return {DIFFUSERS: "yes", COMFYUI: "yes (the file name is the word)",
                INVOKEAI: _width_verdict(shape[0], "embedding (first dimension)")}
    return {}


def checkpoint_readers(layout: str) -> dict[str, str]:
    if layout == "single-file":
        return {DIFFUSERS: "yes (from_single_file)", A1111: "yes", COMFYUI: "yes", INVOKEAI: "yes (Main, sd-1)"}
    return {}


def folder_readers(hub_text_encoder: bool) -> dict[str, str]:
    """A diffusers pipeline folder; a text encoder saved by transformers 5 (no ``text_model.``) loads only there."""
    verdicts = {DIFFUSERS: "yes", A1111: "no: it loads single-file checkpoints"}
    if hub_text_encoder:
        return {**verdicts, COMFYUI: "yes (diffusers loader)", INVOKEAI: "yes (Main, diffusers)"}
    broken = ("no: text encoder keys lack 'text_model.' (transformers 5's layout); it finds none and keeps a "
              "randomly initialised text encoder. Re-save it with dreamtune convert")
    return {**verdicts, COMFYUI: broken, INVOKEAI: broken}


def readers(info: dict[str, Any], header: Header | None = None) -> dict[str, str]:
    """Tool -> verdict for what :func:`dreamtune.weights.describe.describe` found."""
    kind, layout = info["kind"], info["layout"]
    if kind == "lora" and header is not None and info.get("bundled_embeddings"):
        return bundled_readers(list(info["bundled_embeddings"]))
    if kind == "lora" and header is not None:
        return lora_readers(layout, header)
    if kind == "textual-inversion" and header is not None and len(header) == 1:
        return embedding_readers(layout, header)
    if kind == "checkpoint" and layout == "diffusers":
        return folder_readers(bool(info.get("hub_text_encoder")))
    if kind == "checkpoint":
        return checkpoint_readers(layout)
    return {}
