"""The `data:` section of a run config: where images and captions come from and how they are shaped."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Keys a ``data.sources`` entry inherits from the top level of ``data:`` when it leaves them unset.
INHERITED_KEYS = (
    "instance_prompt", "token", "class_name", "caption_extension", "caption_prefix", "caption_suffix",
    "shuffle_tags", "keep_tokens", "caption_dropout", "tag_dropout", "repeats",
    "dataset_config", "dataset_split", "image_column", "caption_column",
)


class SourceOptions(BaseModel):
    """Where one set of images comes from, and the caption rules applied to it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    instance_dir: str | None = Field(
        None, description="Folder of images, searched recursively; a same-name .txt/.caption file is the caption."
    )
    instance_prompt: str | None = Field(
        None, description="Caption template for images without their own caption, e.g. 'a photo of {token} {class}'."
    )
    token: str | None = Field(None, description="The trigger word that replaces {token} in captions (e.g. 'sks').")
    class_name: str | None = Field(None, description="The class word that replaces {class} in captions (e.g. 'dog').")
    caption_extension: str = Field(".txt", description="Sidecar caption extension; '.txt' and '.caption' are also read.")
    ignore_captions: bool = Field(
        False, description="Caption every image with instance_prompt, not its own caption (e.g. a second source "
        "over the same folder, so each image is also trained as just 'a photo of sks'; kohya's second subset).",
    )
    caption_prefix: str = Field("", description="Text put before every caption (e.g. the trigger word or '{token},').")
    caption_suffix: str = Field("", description="Text put after every caption.")
    shuffle_tags: bool = Field(False, description="Shuffle comma-separated tags each epoch.")
    keep_tokens: int = Field(0, ge=0, description="The first N tags stay in place (not shuffled or dropped).")
    caption_dropout: float = Field(0.0, ge=0, le=1, description="Chance a whole caption becomes '' (for CFG).")
    tag_dropout: float = Field(0.0, ge=0, le=1, description="Chance each (not kept) tag is left out.")
    repeats: int = Field(1, ge=1, description="How many times each image appears per epoch ('10_name' folders override).")
    dataset: str | None = Field(
        None, description="A hub dataset id, a local dataset folder (save_to_disk or imagefolder) or a data file."
    )
    dataset_config: str | None = Field(None, description="The dataset's configuration name, if it has several.")
    dataset_split: str = "train"
    image_column: str = "image"
    caption_column: str | None = Field("text", description="Caption column; null uses instance_prompt.")

    @property
    def own_caption_column(self) -> str | None:
        """The dataset column captions are read from: none when unset or with ignore_captions."""
        return None if self.ignore_captions else self.caption_column

    @model_validator(mode="after")
    def _check_source(self) -> "SourceOptions":
        if self.instance_dir and self.dataset:
            raise ValueError("set only one of instance_dir and dataset in one source")
        if self.caption_extension and not self.caption_extension.startswith("."):
            raise ValueError(f"caption_extension must start with '.', got {self.caption_extension!r}")
        return self


class SourceConfig(SourceOptions):
    """One entry of ``data.sources``: unset keys inherit the top-level ``data:`` values."""


class DataConfig(SourceOptions):
    """Image sources, caption rules and transforms shared by every trainer."""

    sources: list[SourceConfig] = Field(
        default_factory=list, description="Several sources in one run; top-level instance_dir/dataset is the shorthand."
    )
    streaming: bool = Field(False, description="Stream data.dataset (too large to hold); resume is approximate.")
    shuffle_buffer: int = Field(1000, ge=1, description="Shuffle buffer size for a streamed dataset.")
    resolution: int = Field(512, ge=8, description="Square training size in pixels (a multiple of 8).")
    center_crop: bool = Field(True, description="Center crop after resizing; false crops at random.")
    random_flip: bool = Field(False, description="Flip half of the images horizontally.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    min_image_side: int | None = Field(
        None, ge=1, description="Skip images whose short side is below this (smaller ones are otherwise only warned)."
    )
    bucketing: bool = Field(False, description="Aspect-ratio buckets of area resolution^2 instead of square crops.")
    min_bucket_side: int = Field(256, ge=8, description="Smallest bucket side in pixels.")
    max_bucket_side: int = Field(1024, ge=8, description="Largest bucket side in pixels.")
    bucket_step: int = Field(64, ge=8, description="Bucket sides are multiples of this.")
    bucket_no_upscale: bool = Field(False, description="Small images get a smaller bucket instead of an upscale.")
    cache_latents: Literal["auto", "none", "memory", "disk"] = Field(
        "auto", description="Encode each image with the VAE once: in memory, or on disk (reused across runs); "
        "auto: memory wherever each image's crop is fixed (center_crop, not streaming), else none.",
    )
    cache_dir: str | None = Field(None, description="Folder for cache_latents=disk; default <first source>/.dreamtune_cache.")
    masked_loss: bool = Field(
        False, description="Weight the loss by a mask per image: its alpha channel, or the same-name image in "
        "data.mask_dir (white = learn, black = background); held-out validation images stay unmasked.",
    )
    mask_dir: str | None = Field(
        None, description="Folder of masks for data.masked_loss, at each image's path relative to its instance_dir "
        "(any image extension; its first channel, red or grey, is the mask).",
    )
    unmasked_weight: float = Field(
        0.0, ge=0, le=1, description="Loss weight of the unmasked area with data.masked_loss (0 ignores it).",
    )
    max_token_length: Literal[75, 150, 225] = Field(
        75, description="Caption tokens the text encoder reads: 150 or 225 encode longer captions in 75-token windows "
        "(kohya's convention); longer captions are cut at this length.",
    )
    cache_text_embeddings: bool | Literal["auto"] = Field(
        "auto", description="Run the frozen text encoder once per distinct caption (needs fixed captions: no tag "
        "shuffle or tag dropout; not with a trained text encoder or textual_inversion); auto: wherever that holds.",
    )

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.resolution % 8:
            raise ValueError(f"data.resolution must be a multiple of 8, got {self.resolution}")
        if self.sources and (self.instance_dir or self.dataset):
            raise ValueError(
                "set either data.sources or the single-source shorthand data.instance_dir/data.dataset, not both"
            )
        if self.bucketing:
            if self.bucket_step % 8:
                raise ValueError(f"data.bucket_step must be a multiple of 8, got {self.bucket_step}")
            if not self.min_bucket_side <= self.resolution <= self.max_bucket_side:
                raise ValueError(
                    f"data.min_bucket_side ({self.min_bucket_side}) <= data.resolution ({self.resolution}) "
                    f"<= data.max_bucket_side ({self.max_bucket_side}) must hold"
                )
        if self.cache_latents in ("memory", "disk") and not self.center_crop:
            raise ValueError(
                f"data.cache_latents={self.cache_latents} needs data.center_crop=true: a random crop differs every "
                "epoch, so there is no fixed latent to cache. Set data.center_crop=true or data.cache_latents=none"
            )
        if self.bucketing and self.streaming:
            raise ValueError("data.bucketing needs every image size up front; it cannot bucket a streamed dataset")
        if self.cache_latents in ("memory", "disk") and self.streaming:
            raise ValueError(
                f"data.cache_latents={self.cache_latents} cannot cache a streamed dataset: a stream is read once and "
                "never held, so every latent would be used once. Set data.streaming=false or data.cache_latents=none"
            )
        if self.cache_text_embeddings is True:
            self._check_fixed_captions()
        self._check_masks()
        return self

    def _check_masks(self) -> None:
        """data.masked_loss reads masks from image files, so it needs folder sources."""
        if self.mask_dir and not self.masked_loss:
            raise ValueError("data.mask_dir is set but data.masked_loss=false; set data.masked_loss=true to use it")
        if self.masked_loss and any(s.dataset for s in self.source_configs()):
            raise ValueError("data.masked_loss reads each image's mask from its file (alpha channel or data.mask_dir), "
                             "so it needs data.instance_dir sources, not data.dataset; drop masked_loss or use a folder")

    def resolve_auto_caches(self, text_encoder_frozen: bool) -> None:
        """Turn cache_latents/cache_text_embeddings ``auto`` into the cache the run can use, and say which.

        The latent cache needs a fixed crop per image (flips are cached both ways); the text cache needs fixed
        captions and a text encoder that never changes (``text_encoder_frozen``, from the method's settings).
        """
        if self.cache_latents == "auto":
            self.cache_latents = "memory" if self.center_crop and not self.streaming else "none"
        if self.cache_text_embeddings == "auto":
            varying = self.streaming or any(s.shuffle_tags or s.tag_dropout for s in self.source_configs())
            self.cache_text_embeddings = text_encoder_frozen and not varying

    def _check_fixed_captions(self) -> None:
        """data.cache_text_embeddings: refuse, naming the key, whatever makes a caption differ between epochs."""
        if self.streaming:
            raise ValueError(
                "data.cache_text_embeddings needs every caption before training starts, but data.streaming=true reads "
                "the dataset once and never holds it. Set data.streaming=false or data.cache_text_embeddings=false"
            )
        why = {"shuffle_tags": "reorders the tags every epoch", "tag_dropout": "drops different tags every epoch"}
        for i, source in enumerate(self.source_configs()):
            own = self.sources[i].model_fields_set if self.sources else set()
            for key, reason in why.items():
                value = getattr(source, key)
                if value:
                    name = f"data.sources[{i}].{key}" if key in own else f"data.{key}"
                    shown = str(value).lower() if isinstance(value, bool) else value
                    raise ValueError(
                        f"data.cache_text_embeddings needs fixed captions, but {name}={shown} {reason}. "
                        f"Set {name}={'false' if key == 'shuffle_tags' else 0} or data.cache_text_embeddings=false "
                        "(caption_dropout is fine: '' is one more fixed caption)"
                    )

    def source_configs(self) -> list[SourceConfig]:
        """The run's sources, each with inherited keys filled from the top level."""
        if not self.sources:
            fields = {k: getattr(self, k) for k in SourceOptions.model_fields}
            return [SourceConfig(**fields)]
        resolved = []
        for source in self.sources:
            merged = {k: getattr(self, k) for k in INHERITED_KEYS}
            merged.update(source.model_dump(exclude_unset=True))
            resolved.append(SourceConfig(**merged))
        return resolved

    def require_source(self) -> None:
        """Fail with the fix when the run has no images to learn from."""
        if not self.instance_dir and not self.dataset and not self.sources:
            raise ValueError(
                "data: no images to train on; set data.instance_dir (a folder of images), "
                "data.dataset (a hub or local dataset) or data.sources (a list of them)"
            )
        for i, source in enumerate(self.sources):
            if not source.instance_dir and not source.dataset:
                raise ValueError(f"data.sources[{i}]: set instance_dir or dataset")
        for i, source in enumerate(self.source_configs()):
            if source.ignore_captions and not source.instance_prompt:
                key = f"data.sources[{i}]" if self.sources else "data"
                raise ValueError(
                    f"{key}.ignore_captions=true captions every image with instance_prompt, but none is set; "
                    f"set {key}.instance_prompt (e.g. 'a photo of {{token}}') or data.instance_prompt"
                )
        if self.streaming and not all(s.dataset for s in self.source_configs()):
            raise ValueError("data.streaming applies to datasets only; every source needs data.dataset")
