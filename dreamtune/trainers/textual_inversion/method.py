"""Textual Inversion training hooks: a new word in the tokenizer whose embedding rows are the only weights that learn."""

from __future__ import annotations

import re
import warnings

import torch

from ...data.captions import ensure_token, pick_template
from ...data.sources import scan_records
from ...errors import ConfigError
from ...training.method import TrainingMethod
from ...weights.embeddings import load_embedding
from ...training.step import StepContext
from .export import DIFFUSERS_FILE, TextualInversionExporter
from .rows import ROWS_KEY, NewRows, refuse_known_words
from .settings import TextualInversionSettings
#: A caption-draw counter some checkpoints hold; templates follow the step context, so it is read and ignored.
LEGACY_BATCHES_KEY = "caption_batches"


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """``<sks>``, ``<sks>_1``, ... : diffusers' names for the vectors of a multi-vector word."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


class TextualInversionMethod(TrainingMethod):
    """Adds the placeholder word; only its rows train, every other weight stays bitwise as loaded."""

    name = "textual_inversion"
    exporter_class = TextualInversionExporter

    settings: TextualInversionSettings

    def __init__(self, cfg):
        super().__init__(cfg)
        self.placeholder = self.settings.placeholder_token
        self.tokens = placeholder_tokens(self.placeholder, self.settings.num_vectors)
        self.rows = NewRows(self.tokens)
        self._expansion = " ".join(self.tokens)
        # The word itself, not the start of one of its own vector names (``<sks>_1``).
        self._pattern = re.compile(re.escape(self.placeholder) + r"(?!_\d)")

    @property
    def token_ids(self) -> list[int]:
        return self.rows.ids

    # -- setup --------------------------------------------------------------------------------
    def setup(self, models, accelerator) -> None:
        super().setup(models, accelerator)
        self._check_output_name()
        initializer_id = self._initializer_id(models.tokenizer)
        refuse_known_words(models.tokenizer, self.tokens, "textual_inversion.placeholder_token")
        start = models.text_encoder.get_input_embeddings().weight.detach()[initializer_id]
        self.rows.add(models.tokenizer, models.text_encoder, start.expand(len(self.tokens), -1).clone())
        if self.settings.init_from:
            self._load_rows(models.text_encoder, self.settings.init_from)
        models.text_encoder.requires_grad_(False)
        self.rows.train(models.text_encoder)
        if not self.settings.use_templates and accelerator.is_main_process:
            self._announce_captions_without_token()

    def _load_rows(self, text_encoder: torch.nn.Module, path: str) -> None:
        """textual_inversion.init_from: the new rows start from an embedding file's vectors."""
        vectors, _ = load_embedding(path, self.cfg.model.allow_pickle)
        weight = text_encoder.get_input_embeddings().weight
        if tuple(vectors.shape) != (len(self.token_ids), weight.shape[1]):
            raise ConfigError(
                f"textual_inversion.init_from: {path} holds {vectors.shape[0]} vectors of width {vectors.shape[1]}, "
                f"this run trains {len(self.token_ids)} of width {weight.shape[1]}: set textual_inversion.num_vectors="
                f"{vectors.shape[0]}" + ("" if vectors.shape[1] == weight.shape[1] else
                                          ", and train on the base the embedding was made for")
            )
        with torch.no_grad():
            weight[self.token_ids] = vectors.to(weight.device, weight.dtype)

    def _check_output_name(self) -> None:
        """The A1111 file is ``final/<output.name>.safetensors``; it must not carry diffusers' own file name,
        which diffusers' loader (given the folder) and InvokeAI take for the diffusers format."""
        if f"{self.cfg.output.name}.safetensors" == DIFFUSERS_FILE:
            raise ConfigError(
                f"output.name: {self.cfg.output.name!r} would name the A1111 file like diffusers' {DIFFUSERS_FILE}; "
                "choose another name (it is also the word A1111 users type)"
            )

    def _initializer_id(self, tokenizer) -> int:
        """The id of the one token the new rows start from."""
        word = self.settings.initializer_token
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise ConfigError(
                f"textual_inversion.initializer_token: {word!r} is {len(ids)} tokens {pieces}, not one; "
                "choose a word the tokenizer keeps whole (e.g. dog, toy, painting)"
            )
        return ids[0]

    def _announce_captions_without_token(self) -> None:
        """One notice, before training, naming how many data captions get the word put in front."""
        word = self.placeholder
        if getattr(self.cfg.data, "streaming", False):  # a stream cannot be counted in advance
            found = f"captions of the streamed dataset without {word!r} get it"
        else:
            records, _ = scan_records(self.cfg.data)
            missing = sum(word not in r.caption for r in records)
            if not missing:
                return
            found = f"{missing} of {len(records)} captions do not contain {word!r}; they get it"
        warnings.warn(
            f"textual_inversion: {found} put in front ('{word} <caption>'). Write it into the captions, "
            "or set textual_inversion.use_templates=true to caption with the templates.",
            stacklevel=2,
        )

    # -- per step -----------------------------------------------------------------------------
    def expand(self, text: str) -> str:
        """``<sks>`` -> ``<sks> <sks>_1 ...`` (as diffusers' ``maybe_convert_prompt`` does at inference)."""
        return self._pattern.sub(lambda _: self._expansion, text)

    def captions(self, captions: list[str], ctx: StepContext) -> list[str]:
        """Template captions (or the data's, with the word ensured), with the word expanded to its vectors.

        Templates are keyed like the loop's noise, by (seed, step, place in the step's global batch), so N
        processes or N accumulated micro-batches draw what one batch N times larger draws.
        """
        s = self.settings
        if s.use_templates:
            picks = [pick_template(s.learnable_property, seed=ctx.seed, epoch=ctx.global_step, index=place)
                     for place in ctx.positions[: len(captions)]]
            texts = [template.format(self.placeholder) for template in picks]
        else:
            texts = [ensure_token(c, self.placeholder) for c in captions]
        return [self.expand(t) for t in texts]

    def encode_text(self, text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """The fp32 text encoder's output in the frozen UNet's dtype (which runs outside autocast)."""
        assert self.models is not None
        return super().encode_text(text_encoder, input_ids).to(self.models.unet.dtype)

    def after_step(self, step: int) -> None:
        """Put every old row back bitwise: AdamW's weight decay moves rows whose gradient is zero."""
        assert self.models is not None
        self.rows.restore_old_rows(self.models.text_encoder.get_input_embeddings().weight)

    # -- checkpoints ----------------------------------------------------------------------------
    def learned_vectors(self, text_encoder: torch.nn.Module) -> torch.Tensor:
        """The new rows, ``[num_vectors, hidden]``, fp32 on the CPU."""
        return self.rows.vectors(text_encoder)

    def trainable_state_dict(self, module_name: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Only the new rows, not the whole table."""
        return {ROWS_KEY: self.learned_vectors(module)}

    def load_trainable_state(self, module_name: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Write the checkpointed rows back into the new token ids."""
        unknown = sorted(set(tensors) - {ROWS_KEY, LEGACY_BATCHES_KEY})
        if unknown or ROWS_KEY not in tensors:
            shown = unknown[:3] or sorted(tensors)[:3]
            raise KeyError(f"tensors {shown} are not a textual-inversion checkpoint of {module_name}")
        self.rows.load(module, tensors[ROWS_KEY],
                       "resume with the textual_inversion.num_vectors and model it was written with")
