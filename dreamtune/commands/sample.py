"""`dreamtune sample`: render a prompt grid PNG with any LoRAs (each at its own weight) and embeddings,
optionally beside the base."""

from __future__ import annotations

import argparse
from pathlib import Path



def _with_value(text: str) -> tuple[Path, str | None]:
    """``file:value`` -> (file, value); a bare file -> (file, None)."""
    path, sep, value = text.rpartition(":")
    return (Path(path), value) if sep and path and not Path(text).exists() else (Path(text), None)


def _is_lycoris(path: Path) -> bool:
    """A kohya-layout file holding LoHa, LoKr or DoRA tensors."""
    from safetensors import safe_open

    from ..weights.lycoris_formats import is_lycoris

    if path.is_dir() or path.suffix != ".safetensors":
        return False
    with safe_open(str(path), "pt") as f:
        return is_lycoris(f.keys())


def _bundled(path: Path) -> tuple[dict, dict] | None:
    """A kohya file with embeddings bundled in (pivotal tuning): (its LoRA tensors, {word: vectors}); else None."""
    from safetensors.torch import load_file

    from ..weights.embeddings import bundled_embeddings, is_bundle_key
    from ..weights.safetensors_io import read_safetensors_header

    if path.is_dir() or path.suffix != ".safetensors" or not any(map(is_bundle_key, read_safetensors_header(path))):
        return None
    tensors = load_file(str(path))
    return {k: v for k, v in tensors.items() if not is_bundle_key(k)}, bundled_embeddings(tensors)


def load_extras(pipe, loras: list[str], embeddings: list[str], default_scale: float) -> list[str]:
    """Load each LoRA (``FILE[:WEIGHT]``) and embedding (``FILE[:TOKEN]``) into ``pipe``; return what was loaded."""
    from ..errors import DreamtuneError
    from ..weights.safetensors_io import read_safetensors_header

    names, weights, loaded = [], [], []
    for i, text in enumerate(loras):
        path, weight = _with_value(text)
        if not path.exists():
            raise DreamtuneError(f"--lora: {path} does not exist")
        try:
            scale = default_scale if weight is None else float(weight)
        except ValueError:
            raise DreamtuneError(f"--lora {text}: the weight after ':' must be a number, e.g. {path}:0.8") from None
        if _is_lycoris(path):  # LoHa/LoKr/DoRA: diffusers cannot load them; patch the weights as a UI does
            from ..weights.lycoris_files import read_adapter
            from ..weights.lycoris_merge import patch_models

            patch_models(read_adapter(path), {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, scale)
            loaded.append(f"{path.stem} x{scale:g}")
            continue
        folder, name = (path, None) if path.is_dir() else (path.parent, path.name)
        if bundle := _bundled(path):  # the LoRA keys (diffusers refuses the whole file), then each word
            pipe.load_lora_weights(bundle[0], adapter_name=f"lora{i}")
            for word, vectors in bundle[1].items():
                pipe.load_textual_inversion(vectors, token=word)
                loaded.append(f"embedding {word}")
        else:
            pipe.load_lora_weights(str(folder), weight_name=name, adapter_name=f"lora{i}")
        names.append(f"lora{i}")
        weights.append(scale)
        loaded.append(f"{path.stem} x{scale:g}")
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    for text in embeddings:
        path, token = _with_value(text)
        if not path.is_file():
            raise DreamtuneError(f"--embedding: {path} is not a file")
        header = read_safetensors_header(path)
        if token is None and "emb_params" in header:
            token = path.stem  # an A1111 embedding: its file name is the word to type
        if [k for k in header if k != "__metadata__"] == ["clip_l"]:  # the advanced script's file: no words in it
            from ..weights.embeddings import load_embedding
            from ..weights.safetensors_io import read_metadata

            token = token or read_metadata(path).get("modelspec.trigger_phrase") or path.stem
            pipe.load_textual_inversion(load_embedding(path)[0], token=token)
        else:
            pipe.load_textual_inversion(str(path), token=token)
        loaded.append(f"embedding {token or path.name}")
    return loaded


def run(args: argparse.Namespace) -> int:
    import torch

    from ..models.loading import load_pipeline
    from ..models.pipeline import inference_scheduler
    from ..models.render import render_images, save_grid

    pipe = load_pipeline(args.model)
    pipe.scheduler = inference_scheduler(pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    kwargs = dict(
        images_per_prompt=args.images_per_prompt, seed=args.seed, steps=args.steps,
        guidance_scale=args.guidance_scale, resolution=resolution, negative_prompt=args.negative_prompt,
    )
    if args.clip_skip != 1 or args.max_token_length != 75:  # as the LoRA or model was trained (model.clip_skip, ...)
        from ..models.text import check_clip_skip, encode_tokens, token_ids

        check_clip_skip(pipe.text_encoder, args.clip_skip)
        kwargs["encode"] = lambda text: encode_tokens(
            pipe.text_encoder, token_ids(pipe.tokenizer, [text], args.max_token_length).to(pipe.device), args.clip_skip)
    rows, labels = [], []
    with torch.no_grad():
        if args.with_base and (args.lora or args.embedding):
            rows += render_images(pipe, args.prompt, **kwargs)
            labels += [f"base: {p}" for p in args.prompt]
        loaded = load_extras(pipe, args.lora, args.embedding, args.lora_scale)
        rows += render_images(pipe, args.prompt, **kwargs)
    labels += [f"{', '.join(loaded)}: {p}" if loaded else p for p in args.prompt]
    path = save_grid(rows, Path(args.out), labels=labels)
    print(f"sample grid written to {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="render a prompt grid PNG, with LoRAs and embeddings or without")
    p.add_argument("--model", required=True, help="diffusers folder, hub id or single-file .safetensors")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several rows")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA-family file (kohya/LyCORIS LoRA, DoRA, LoHa, LoKr, or diffusers) or a folder "
                   "holding one, with an optional weight; repeatable")
    p.add_argument("--lora-scale", type=float, default=1.0, help="weight of each --lora given without one")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="a Textual Inversion file (diffusers or A1111; an A1111 file's word is its file name "
                        "unless :TOKEN is given); repeatable")
    p.add_argument("--with-base", action="store_true", help="also render the base model's rows, first")
    p.add_argument("--out", default="samples.png", help="output PNG")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--negative-prompt")
    p.add_argument("--resolution", type=int, help="default: the model's native size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip-skip", type=int, default=1, choices=range(1, 13), metavar="N",
                   help="condition on the text encoder's N-th layer from the end, as model.clip_skip (2 = A1111's "
                        "CLIP skip 2); a LoRA trained with it records ss_clip_skip")
    p.add_argument("--max-token-length", type=int, default=75, choices=(75, 150, 225),
                   help="read prompts up to this many tokens in 75-token windows, as data.max_token_length")
    p.set_defaults(func=run)
