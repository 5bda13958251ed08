"""Pivotal tuning: new words and a LoRA-family adapter learned together, exported for diffusers and the UIs."""

from ...registry import register_method
from .settings import PivotalSettings

register_method("pivotal", PivotalSettings, "dreamtune.trainers.pivotal.method:PivotalMethod")
