"""dreamtune: fine-tune Stable Diffusion 1.x with DreamBooth, LoRA and Textual Inversion."""

from .quiet import silence_third_party_noise

silence_third_party_noise()
