"""A word's token-embedding rows, carried in a LoRA file as a bundled embedding and merged back.

A DreamBooth run that trains the text encoder moves the rows of its trigger word's tokens; no LoRA
module holds them. ``extract-lora --trigger WORD`` bundles those rows as ``bundle_emb.WORD.*`` (A1111
types the word and gets the vectors, one per token of the word), and ``merge-lora`` writes a bundled
embedding back into the token rows of a word the checkpoint's tokenizer spells with that many tokens.
A new word (pivotal tuning's ``<s0>``) has no row in a checkpoint, so it stays in its embedding file.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import WeightsError
from .ldm_keys import TEXT_MODEL_PREFIX
from .sources import TensorSource

TOKEN_EMBEDDING_KEY = TEXT_MODEL_PREFIX + "embeddings.token_embedding.weight"


def word_ids(tokenizer, word: str) -> list[int]:
    """The token ids the tokenizer spells ``word`` with (no start/end tokens); unknown pieces count as none."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return [] if tokenizer.unk_token_id in ids else list(ids)


def trigger_rows(base: TensorSource, tuned: TensorSource, tokenizer, word: str) -> torch.Tensor:
    """The fine-tune's token-embedding rows of ``word`` ``[tokens, hidden]``; refused if they did not move."""
    ids = word_ids(tokenizer, word)
    if not ids:
        raise WeightsError(f"--trigger {word!r}: the tokenizer has no spelling for it; give the word the prompts use")
    for source in (base, tuned):
        if TOKEN_EMBEDDING_KEY not in source:
            raise WeightsError(f"{source.name} has no {TOKEN_EMBEDDING_KEY!r}; --trigger needs both text encoders")
    rows = tuned.get(TOKEN_EMBEDDING_KEY)[ids].float()
    if torch.equal(rows, base.get(TOKEN_EMBEDDING_KEY)[ids].float()):
        raise WeightsError(f"--trigger {word!r}: its token rows are the same in {tuned.name} and {base.name}; "
                           "the fine-tune did not train the text encoder on that word")
    return rows


def merge_words(token_embedding: torch.Tensor, embeddings: Mapping[str, torch.Tensor],
                tokenizer) -> tuple[torch.Tensor, list[str], dict[str, str]]:
    """``token_embedding`` with each bundled word's rows written in; also the merged words and, per skipped one, why."""
    out = token_embedding.clone()
    merged, skipped = [], {}
    for word, vectors in embeddings.items():
        ids = word_ids(tokenizer, word)
        if len(ids) != vectors.shape[0]:
            skipped[word] = (f"the tokenizer spells {word!r} with {len(ids)} tokens and the file has "
                             f"{vectors.shape[0]} vectors (a new word has no row in a checkpoint); load its "
                             "embedding file where you use the model")
            continue
        if vectors.shape[1] != out.shape[1]:
            raise WeightsError(f"bundled embedding {word!r} is {vectors.shape[1]} wide; the text encoder is "
                               f"{out.shape[1]}: is the file for another model?")
        out[ids] = vectors.to(out.dtype)
        merged.append(word)
    return out, merged, skipped


def merge_bundled_words(state: dict[str, torch.Tensor], files, tokenizer) -> tuple[list[str], dict[str, str]]:
    """Write the words bundled in the adapter ``files`` (``[(AdapterFile, strength)]``) into ``state``'s token rows,
    whole whatever the strength, as A1111 applies a bundled embedding; returns the merged words and the skipped."""
    words = {word: vectors for adapters, _ in files for word, vectors in adapters.embeddings.items()}
    if not words:
        return [], {}
    if TOKEN_EMBEDDING_KEY not in state:
        return [], {word: "the checkpoint has no text encoder" for word in words}
    state[TOKEN_EMBEDDING_KEY], merged, skipped = merge_words(state[TOKEN_EMBEDDING_KEY], words, tokenizer)
    return merged, skipped
