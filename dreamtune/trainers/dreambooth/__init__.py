"""DreamBooth: every UNet weight (the text encoder too when asked), with EMA and prior preservation."""

from ...registry import register_method
from .settings import DreamBoothSettings

register_method("dreambooth", DreamBoothSettings, "dreamtune.trainers.dreambooth.method:DreamBoothMethod")
