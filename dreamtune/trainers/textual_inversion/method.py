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
from .settings import TextualInversionSettings

#: Checkpoint key: the new rows ``[num_vectors, hidden]``.
ROWS_KEY = "placeholder_rows"
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
        self.token_ids: list[int] = []
        self._expansion = " ".join(self.tokens)
        # The word itself, not the start of one of its own vector names (``<sks>_1``).
        self._pattern = re.compile(re.escape(self.placeholder) + r"(?!_\d)")
        self._original: torch.Tensor | None = None
        self._new_rows: torch.Tensor | None = None

    # -- setup --------------------------------------------------------------------------------
    def setup(self, models, accelerator) -> None:
        super().setup(models, accelerator)
        self._check_output_name()
        initializer_id = self._initializer_id(models.tokenizer)
        self._check_placeholder(models.tokenizer)
        self.token_ids = self._add_tokens(models.tokenizer, models.text_encoder, initializer_id)
        if self.settings.init_from:
            self._load_rows(models.text_encoder, self.settings.init_from)
        models.text_encoder.requires_grad_(False)
        weight = models.text_encoder.get_input_embeddings().weight
        weight.requires_grad_(True)
        self._original = weight.detach().clone()
        self._new_rows = torch.zeros(weight.shape[0], dtype=torch.bool)
        self._new_rows[self.token_ids] = True
        weight.register_hook(self._mask_gradient)
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

    def _check_placeholder(self, tokenizer) -> None:
        """The placeholder (and its vector names) must be new words, not tokens the model already knows."""
        vocab = tokenizer.get_vocab()
        taken = [t for t in self.tokens if t in vocab]
        ids = tokenizer.encode(self.placeholder, add_special_tokens=False)
        if not taken and len(ids) == 1:
            taken = [f"{self.placeholder} (read as {tokenizer.convert_ids_to_tokens(ids)[0]!r})"]
        if taken:
            raise ConfigError(
                f"textual_inversion.placeholder_token: {', '.join(taken)} already in the tokenizer's vocabulary; "
                "choose a new word such as '<my-concept>' or 'S*'"
            )

    def _add_tokens(self, tokenizer, text_encoder: torch.nn.Module, initializer_id: int) -> list[int]:
        """Add the vector names to the tokenizer and rows to the table, each a copy of the initializer's row."""
        from transformers import AddedToken

        # normalized=False: matched case-sensitively before CLIP lowercases, so 'S*' stays 'S*' and
        # diffusers' prompt expansion (which looks tokens up by their spelling) finds every vector.
        tokenizer.add_tokens([AddedToken(t, normalized=False) for t in self.tokens])
        ids = tokenizer.convert_tokens_to_ids(self.tokens)
        if len(tokenizer) > text_encoder.get_input_embeddings().num_embeddings:
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[ids] = weight[initializer_id].clone()
        return ids

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

    def _mask_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """Zero every row's gradient but the new ones: clipping and Adam see only what learns."""
        keep = self._rows_on(grad.device).unsqueeze(1)
        return torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))

    def after_step(self, step: int) -> None:
        """Put every old row back bitwise: AdamW's weight decay moves rows whose gradient is zero."""
        weight = self._weight()
        original = self._original_on(weight)
        with torch.no_grad():
            weight.copy_(torch.where(self._rows_on(weight.device).unsqueeze(1), weight, original))

    def _weight(self) -> torch.nn.Parameter:
        assert self.models is not None
        return self.models.text_encoder.get_input_embeddings().weight

    def _rows_on(self, device: torch.device) -> torch.Tensor:
        assert self._new_rows is not None
        if self._new_rows.device != device:
            self._new_rows = self._new_rows.to(device)
        return self._new_rows

    def _original_on(self, weight: torch.Tensor) -> torch.Tensor:
        assert self._original is not None
        if self._original.device != weight.device or self._original.dtype != weight.dtype:
            self._original = self._original.to(weight.device, weight.dtype)
        return self._original

    # -- checkpoints ----------------------------------------------------------------------------
    def learned_vectors(self, text_encoder: torch.nn.Module) -> torch.Tensor:
        """The new rows, ``[num_vectors, hidden]``, fp32 on the CPU."""
        weight = text_encoder.get_input_embeddings().weight
        return weight.detach()[self.token_ids].float().cpu()

    def trainable_state_dict(self, module_name: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Only the new rows, not the whole table."""
        return {ROWS_KEY: self.learned_vectors(module)}

    def load_trainable_state(self, module_name: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Write the checkpointed rows back into the new token ids."""
        unknown = sorted(set(tensors) - {ROWS_KEY, LEGACY_BATCHES_KEY})
        if unknown or ROWS_KEY not in tensors:
            shown = unknown[:3] or sorted(tensors)[:3]
            raise KeyError(f"tensors {shown} are not a textual-inversion checkpoint of {module_name}")
        weight = module.get_input_embeddings().weight
        rows = tensors[ROWS_KEY]
        if tuple(rows.shape) != (len(self.token_ids), weight.shape[1]):
            raise ConfigError(
                f"checkpoint rows have shape {tuple(rows.shape)} but this run trains {len(self.token_ids)} x "
                f"{weight.shape[1]}; resume with the textual_inversion.num_vectors and model it was written with"
            )
        with torch.no_grad():
            weight[self.token_ids] = rows.to(weight.device, weight.dtype)
