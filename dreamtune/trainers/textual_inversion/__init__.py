"""Textual Inversion: a new word whose embedding rows are the only weights that learn."""

from ...registry import register_method
from .settings import TextualInversionSettings

register_method(
    "textual_inversion", TextualInversionSettings, "dreamtune.trainers.textual_inversion.method:TextualInversionMethod"
)
