"""LoRA: low-rank adapters on the UNet (and optionally the text encoder), exported for diffusers and the UIs."""

from ...registry import register_method
from .settings import LoraSettings

register_method("lora", LoraSettings, "dreamtune.trainers.lora.method:LoraMethod")
