"""The one place an image record's caption becomes the caption a trainer sees."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, Iterable


@dataclass(frozen=True)
class CaptionRules:
    """Per-source caption settings: template words, prefix/suffix, tag shuffling and dropout."""

    instance_prompt: str | None = None
    token: str | None = None
    class_name: str | None = None
    prefix: str = ""
    suffix: str = ""
    shuffle_tags: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0

    @classmethod
    def from_source(cls, source: Any) -> "CaptionRules":
        """Rules from a SourceConfig (or anything with the same attribute names)."""
        return cls(
            instance_prompt=source.instance_prompt, token=source.token, class_name=source.class_name,
            prefix=source.caption_prefix, suffix=source.caption_suffix, shuffle_tags=source.shuffle_tags,
            keep_tokens=source.keep_tokens, caption_dropout=source.caption_dropout, tag_dropout=source.tag_dropout,
        )


def fill_template(text: str, rules: CaptionRules) -> str:
    """Replace ``{token}`` and ``{class}`` (other braces are left as they are)."""
    if rules.token is not None:
        text = text.replace("{token}", rules.token)
    if rules.class_name is not None:
        text = text.replace("{class}", rules.class_name)
    return text


def base_caption(own: str | None, rules: CaptionRules, fallback: str | None = None) -> str | None:
    """The image's own caption, else the filled instance prompt, else ``fallback`` (e.g. folder words)."""
    text = own or rules.instance_prompt or fallback
    return fill_template(text.strip(), rules) if text else None


def caption_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The caption's random stream, a function of (seed, epoch, index) only."""
    return random.Random(f"caption:{seed}:{epoch}:{index}")


def render_caption(base: str, rules: CaptionRules, rng: random.Random) -> str:
    """Apply shuffle, tag dropout, prefix/suffix (``{token}``/``{class}`` filled) and caption dropout to ``base``."""
    if rules.caption_dropout and rng.random() < rules.caption_dropout:
        return ""
    if rules.shuffle_tags or rules.tag_dropout:
        tags = [t.strip() for t in base.split(",") if t.strip()]
        kept, rest = tags[: rules.keep_tokens], tags[rules.keep_tokens :]
        if rules.tag_dropout:
            rest = [t for t in rest if rng.random() >= rules.tag_dropout]
        if rules.shuffle_tags:
            rng.shuffle(rest)
        base = ", ".join(kept + rest)
    prefix, suffix = (fill_template(text.strip(), rules) for text in (rules.prefix, rules.suffix))
    return " ".join(part for part in (prefix, base, suffix) if part)


def longest_caption(base: str, rules: CaptionRules) -> str:
    """``base`` with its prefix and suffix and every tag kept: the most a step can hand the text encoder."""
    kept = replace(rules, shuffle_tags=False, tag_dropout=0.0, caption_dropout=0.0)
    return render_caption(base, kept, random.Random(0))


def count_long_captions(captions: Iterable[str], tokenizer: Any, max_length: int = 77) -> int:
    """How many captions have more tokens (with begin/end tokens) than the text encoder reads."""
    captions = [c for c in captions if c]
    if not captions:
        return 0
    ids = tokenizer(captions, truncation=False, padding=False)["input_ids"]
    return sum(len(row) > max_length for row in ids)
