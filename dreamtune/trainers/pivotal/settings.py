"""The ``pivotal:`` section: the new words, where their vectors start, their learning rate, stop and norm.

The adapter is configured by the ``lora:`` section (every ``lora.type``), read by the pivotal run too.
"""

from __future__ import annotations

from pydantic import Field, PrivateAttr, model_validator

from ...config import MethodSettings
from ..lora.settings import LoraSettings

#: Where a pivotal run sets no value: the community LoRA recipe (lr 1e-4, ~1000 steps), for the adapter.
TRAIN_DEFAULTS = {"learning_rate": 1.0e-4, "max_steps": 1000}


class PivotalSettings(MethodSettings):
    _run_lora: LoraSettings | None = PrivateAttr(None)  # the run's lora: section, for card_settings/skips_modules

    num_vectors: int = Field(2, ge=1, le=75, description="New words learned: <s0>, <s1>, ... (the advanced script's).")
    tokens: list[str] | None = Field(
        None, description="Names of the new words instead of <s0> <s1> ...; as many as num_vectors."
    )
    initializer: str | None = Field(
        None, description="Words the vectors start from (their tokens, repeated to fill); null: random rows at "
        "the vocabulary's scale, as diffusers' advanced script.",
    )
    learning_rate: float = Field(5.0e-4, gt=0, description="Learning rate of the new rows (the adapter uses train's).")
    stop_fraction: float = Field(
        0.5, gt=0, le=1, description="Train the new rows for this fraction of train.max_steps, then only the adapter."
    )
    adapter_start: float = Field(
        0.0, ge=0, lt=1, description="The adapter learns from this fraction of train.max_steps on; the words learn "
        "alone before (pivotal tuning's original order). 0 trains both from the start, as the advanced script.",
    )
    norm_pull: float = Field(
        0.1, ge=0, le=1, description="After each step each new row's norm moves this far (in log scale) toward the "
        "vocabulary's mean row norm; 1 sets it exactly, 0 leaves it free.",
    )

    @model_validator(mode="after")
    def _check(self) -> "PivotalSettings":
        if self.adapter_start > self.stop_fraction:
            raise ValueError(f"pivotal.adapter_start ({self.adapter_start}) is after pivotal.stop_fraction "
                             f"({self.stop_fraction}): nothing would train in between; start the adapter earlier")
        if self.tokens is not None:
            if len(self.tokens) != self.num_vectors:
                raise ValueError(f"pivotal.tokens has {len(self.tokens)} words but pivotal.num_vectors is "
                                 f"{self.num_vectors}; give one word per vector or drop pivotal.tokens")
            bad = [t for t in self.tokens if not t or any(c.isspace() for c in t)]
            if bad or len(set(self.tokens)) != len(self.tokens):
                raise ValueError("pivotal.tokens: each word must be new, distinct, non-empty and without spaces "
                                 "(e.g. ['<s0>', '<s1>'])")
        return self

    @property
    def words(self) -> list[str]:
        """The new words, in order."""
        return self.tokens or [f"<s{i}>" for i in range(self.num_vectors)]

    @property
    def phrase(self) -> str:
        """What ``{token}`` becomes in captions and what diffusers prompts write: the words run together."""
        return "".join(self.words)

    def start_step(self, max_steps: int) -> int:
        """Steps done before the adapter learns."""
        return round(self.adapter_start * max_steps)

    def stop_step(self, max_steps: int) -> int:
        """The last step that trains the new rows."""
        return max(1, round(self.stop_fraction * max_steps))

    def apply_run_defaults(self, cfg) -> None:
        """The adapter section (defaults if absent), train's lr and steps where unset, and {token} -> the words."""
        for key, value in TRAIN_DEFAULTS.items():
            if key not in cfg.train.model_fields_set:
                setattr(cfg.train, key, value)
        if cfg.data.token is None:
            cfg.data.token = self.phrase
        if cfg.lora is None:  # last: assigning a section validates the whole run again
            cfg.lora = LoraSettings()
        self._run_lora = cfg.lora

    def check_run(self, cfg) -> None:
        if cfg.data.token != self.phrase:
            raise ValueError(f"data.token is {cfg.data.token!r}, but trainer: pivotal fills {{token}} with its new "
                             f"words {self.phrase!r}; leave data.token unset (or name the words with pivotal.tokens)")
        if "." in cfg.output.name:
            raise ValueError(f"output.name {cfg.output.name!r} names the bundled embedding (the word A1111 users "
                             "type), and A1111 splits bundle keys at dots; choose a name without '.'")
        cfg.lora.check_run(cfg)

    def skips_modules(self) -> bool:
        return self._lora().skips_modules() or self.stop_fraction < 1

    def trained_models(self) -> tuple[str, ...]:
        return ("unet", "text_encoder")

    def text_encoder_change(self) -> tuple[str, str | None] | None:
        return "trainer: pivotal learns new rows of the text encoder's embedding table", None

    def card_settings(self) -> str:
        start = f"from {self.initializer!r}" if self.initializer else "random start"
        return (f"words {self.phrase} ({start}, lr {self.learning_rate}, trained for {self.stop_fraction:.0%} of the "
                f"steps, norm pull {self.norm_pull}), adapter: {self._lora().card_settings()}")

    def _lora(self) -> LoraSettings:
        return self._run_lora or LoraSettings()
