"""The ``textual_inversion:`` section: the new word, its initializer and vectors, and the caption templates."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ...config import MethodSettings
from ...data.captions import templates_for

#: Where a textual_inversion run sets no value: the community recipe (lr 5e-4, ~3000 steps).
TRAIN_DEFAULTS = {"learning_rate": 5.0e-4, "max_steps": 3000}


class TextualInversionSettings(MethodSettings):
    placeholder_token: str = Field(
        "<sks>", description="The new word to learn, e.g. '<sks>' or 'S*'; it must not already be a token."
    )
    initializer_token: str = Field(
        "*", description="One existing token the new vectors start from (e.g. dog, toy, painting); A1111 uses '*'."
    )
    num_vectors: int = Field(
        1, ge=1, le=75, description="Vectors behind the word; '<sks>' expands to '<sks> <sks>_1 ...' in prompts."
    )
    learnable_property: Literal["object", "style"] = Field(
        "object", description="Caption templates to train with: 'a photo of a {}' or 'a painting in the style of {}'."
    )
    use_templates: bool = Field(
        True, description="Caption with the TI templates; false uses the data captions (the word prepended if missing)."
    )
    export_pt: bool = Field(False, description="Also write the legacy A1111 .pt embedding (a pickle).")
    init_from: str | None = Field(
        None, description="Start the vectors from this embedding file (diffusers or A1111); num_vectors must match."
    )

    @field_validator("placeholder_token")
    @classmethod
    def _one_word(cls, token: str) -> str:
        if not token or any(c.isspace() for c in token):
            raise ValueError("must be one new word, not empty and without spaces; use e.g. '<sks>' or 'S*'")
        return token

    def fallback_caption(self) -> str:
        """The caption for images without one: the first template of the learnable property."""
        return templates_for(self.learnable_property)[0].format(self.placeholder_token)

    def check_run(self, cfg) -> None:
        if self.init_from and not Path(self.init_from).is_file():
            raise ValueError(f"textual_inversion.init_from: {self.init_from} is not a file; give an embedding "
                             ".safetensors (diffusers learned_embeds or A1111)")

    def apply_run_defaults(self, cfg) -> None:
        """TI's own lr and steps where train: leaves them unset, and a caption holding the new word."""
        for key, value in TRAIN_DEFAULTS.items():
            if key not in cfg.train.model_fields_set:
                setattr(cfg.train, key, value)
        if cfg.data.instance_prompt is None:
            cfg.data.instance_prompt = self.fallback_caption()

    def trained_models(self) -> tuple[str, ...]:
        return ("text_encoder",)

    def text_encoder_change(self) -> tuple[str, str | None] | None:
        return "trainer: textual_inversion learns new rows of the text encoder's embedding table", None

    def card_settings(self) -> str:
        return (f"word {self.placeholder_token} ({self.num_vectors} vectors from {self.initializer_token!r}, "
                f"{self.learnable_property})")
