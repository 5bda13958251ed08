"""Build Stable Diffusion 1.x-architecture pipelines with random weights, offline: tiny, or SD 1.5-shaped.

The tiny one is the embedded default: same classes, same key layout and same tokenizer kind (CLIP BPE)
as SD 1.5, only narrow, so tests run offline on a CPU in seconds (the quickstart uses the toy-world model).
The SD 1.5-shaped one (shipped configs and CLIP tokenizer) has SD 1.5's every shape: memory, speed and
export layouts are SD 1.5's, though it draws noise.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from ..weights.diffusers_folder import save_pipeline_folder
from .dtypes import dtype_of
from .pipeline import build_pipeline

# Words the tiny tokenizer learns merges from: our prompts, captions and common English.
_CORPUS = """
a an the of on in at with and or to from by for is are this that photo picture painting drawing
image render style art portrait close up closeup high quality detailed sks dog cat person man woman
pokemon cartoon anime creature monster character sitting standing running beach forest city street
mountain snow river park garden house room table chair bed car road sky cloud sun moon night day
red orange yellow green blue purple pink brown black white gray grey gold silver colorful bright dark
circle square triangle star heart shape ring cross diamond hexagon small large big tiny top bottom
left right center middle background foreground plain simple toy world concept new rare token
wearing hat glasses smiling happy cute fluffy wet dry old young beautiful ugly water fire grass
ground rock stone wood metal glass paper one two three four five many some very
"""

_SPECIALS = ("<|startoftext|>", "<|endoftext|>")

#: Shapes of the tiny model; the UNet has two levels where SD 1.5 has four, which is what
#: exposes conversions that hard-code SD 1.5's layout.
TINY_RECIPE = {
    "resolution": 64,
    "bpe_merges": 600,
    "unet": {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 2,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 16,
    },
    "vae": {
        "sample_size": 64,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 32],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 16,
    },
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": 32,
        "hidden_act": "quick_gelu",
    },
    # SD 1.5's noise schedule, so the tiny model trains under the same objective.
    "scheduler": {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
    },
}


def learn_bpe(corpus: str, num_merges: int) -> tuple[dict[str, int], list[str]]:
    """Learn CLIP-style BPE (``</w>`` word ends) from ``corpus``; deterministic tie-breaks."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # CLIP's reversible byte table

    base = list(bytes_to_unicode().values())
    vocab_tokens = base + [c + "</w>" for c in base]
    words = Counter(re.findall(r"[a-z]+", corpus.lower()))
    splits = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges: list[str] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for w, count in words.items():
            sym = splits[w]
            for a, b in zip(sym, sym[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(f"{best[0]} {best[1]}")
        vocab_tokens.append(best[0] + best[1])
        for w, sym in splits.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            splits[w] = out
    vocab_tokens += list(_SPECIALS)
    return {tok: i for i, tok in enumerate(vocab_tokens)}, merges


def build_tokenizer(num_merges: int = TINY_RECIPE["bpe_merges"]):
    from transformers import CLIPTokenizer

    vocab, merges = learn_bpe(_CORPUS, num_merges)
    pairs = [tuple(m.split(" ")) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=77)


def clip_text_encoder(tokenizer, config: dict):
    """A randomly initialised CLIP text encoder sized by ``config`` for ``tokenizer``'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    ))


def assemble_pipeline(tokenizer, text_encoder, vae, unet, scheduler_config: dict):
    """A ``StableDiffusionPipeline`` from parts, with SD 1.5's PNDM scheduler and no safety checker."""
    from diffusers import PNDMScheduler

    return build_pipeline(tokenizer, text_encoder, vae, unet, PNDMScheduler(**scheduler_config), progress_bar=True)


def build_tiny_pipeline(seed: int = 0):
    """Return a ``StableDiffusionPipeline`` with random weights drawn from ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_RECIPE["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_RECIPE["vae"])
    torch.manual_seed(seed + 2)
    text_encoder = clip_text_encoder(tokenizer, TINY_RECIPE["text_encoder"])
    return assemble_pipeline(tokenizer, text_encoder, vae, unet, TINY_RECIPE["scheduler"])


def build_sd15_pipeline(seed: int = 0, device: str | torch.device | None = None):
    """An SD 1.5-architecture ``StableDiffusionPipeline`` with random weights from ``seed``.

    Built on ``device`` (default: CUDA when present, where initialising 1.1 B parameters takes seconds);
    ``"meta"`` gives every module and shape without memory, for layout checks.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..weights.diffusers_folder import SD1_CONFIG_DIR, read_config, sd1_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(read_config(SD1_CONFIG_DIR, "unet"))
        vae = AutoencoderKL.from_config(read_config(SD1_CONFIG_DIR, "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(read_config(SD1_CONFIG_DIR, "text_encoder")))
    scheduler = PNDMScheduler.from_config(read_config(SD1_CONFIG_DIR, "scheduler"))
    return build_pipeline(sd1_tokenizer(), text_encoder, vae, unet, scheduler)


#: ``dreamtune make-tiny-model --architecture``: name -> what it builds.
ARCHITECTURES = {"tiny": build_tiny_pipeline, "sd15": build_sd15_pipeline}


def save_tiny_model(out_dir: str | Path, seed: int = 0, architecture: str = "tiny", dtype: str = "fp32") -> Path:
    """Build a random pipeline of ``architecture`` and save it as a diffusers folder (safetensors, weights in ``dtype``)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; use one of {', '.join(ARCHITECTURES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = ARCHITECTURES[architecture](seed)
    pipe.to("cpu", dtype_of(dtype))
    save_pipeline_folder(pipe, out)
    recipe = TINY_RECIPE if architecture == "tiny" else {"configs": "dreamtune/weights/sd1_configs"}
    (out / "dreamtune_recipe.json").write_text(
        json.dumps({"seed": seed, "architecture": architecture, "dtype": dtype, **recipe}, indent=2) + "\n"
    )
    return out
