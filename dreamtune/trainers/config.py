"""The run config: typed sections, YAML loading, ``key.sub=value`` overrides and readable errors."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..data.captions import templates_for
from ..data.config import DataConfig

TRAINERS = ("dreambooth", "lora", "textual_inversion")


class ConfigError(ValueError):
    """A config problem, found before any model loads; the message names the file and key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    pretrained: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="Hub id, local diffusers folder, or single-file .safetensors checkpoint.",
    )
    revision: str | None = None
    variant: str | None = Field(None, description="Weight variant on the hub, e.g. 'fp16'.")
    vae: str | None = Field(None, description="Optional replacement VAE (hub id or folder).")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="Override the base scheduler's prediction type."
    )
    allow_pickle: bool = Field(False, description="Allow .ckpt single-file checkpoints (pickle; trusted files only).")


class TrainConfig(Section):
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    learning_rate: float = Field(1.0e-4, gt=0)
    scale_lr: bool = Field(False, description="Multiply lr by batch size x accumulation x processes.")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1.0e-2, ge=0)
    adam_epsilon: float = Field(1.0e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables it.")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 42
    snr_gamma: float | None = Field(None, gt=0, description="Min-SNR loss weighting gamma (5.0 is usual).")
    noise_offset: float = Field(0.0, ge=0)
    gradient_checkpointing: bool = False
    save_every: int = Field(500, ge=0, description="Checkpoint cadence in steps; 0 saves none mid-run.")
    checkpoints_total_limit: int | None = Field(3, ge=1)
    resume: str | None = Field(None, description="null, 'auto' (latest checkpoint) or a checkpoint folder.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        # YAML 1.1 reads an unquoted `no` (accelerate's spelling, in a file or on the command line) as false.
        return "no" if value is False else value


class ValidationConfig(Section):
    prompts: list[str] = Field(default_factory=list)
    every: int = Field(0, ge=0, description="Render the prompts every N steps; 0 only at the end.")
    num_inference_steps: int = Field(25, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    negative_prompt: str | None = None
    images_per_prompt: int = Field(2, ge=1)
    seed: int = 0
    compare_with_base: bool = Field(
        False, description="Also render the prompts before training (step 0) and write samples/base-vs-trained.png.",
    )


class LoggingConfig(Section):
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    project: str = "dreamtune"
    every: int = Field(10, ge=1, description="Log scalars every N steps.")


class ExportConfig(Section):
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp16", description="dtype of the single-file exports.")
    blend_alpha: list[Annotated[float, Field(ge=0, le=1)]] | None = Field(
        None,
        description="DreamBooth: also write alpha*fine-tune + (1-alpha)*base single files, one per value "
        "(the Pokemon recipe's style strength); a single number is accepted.",
    )

    @field_validator("blend_alpha", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, (int, float)) else value


class OutputConfig(Section):
    dir: str = "outputs/run"
    name: str = Field("dreamtune", pattern=r"^[A-Za-z0-9._-]+$", description="Base name of exported files.")


class LoraSettings(Section):
    rank: int = Field(4, ge=1)
    alpha: float = Field(4.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train_text_encoder: bool = False
    text_encoder_rank: int | None = Field(None, ge=1)
    text_encoder_alpha: float | None = Field(None, gt=0)
    text_encoder_lr: float | None = Field(None, gt=0, description="Text-encoder LoRA lr; default train.learning_rate.")
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )


class TextualInversionSettings(Section):
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

    @field_validator("placeholder_token")
    @classmethod
    def _one_word(cls, token: str) -> str:
        if not token or any(c.isspace() for c in token):
            raise ValueError("must be one new word, not empty and without spaces; use e.g. '<sks>' or 'S*'")
        return token

    def fallback_caption(self) -> str:
        """The caption for images without one: the first template of the learnable property."""
        return templates_for(self.learnable_property)[0].format(self.placeholder_token)


#: Where a textual_inversion run sets no value: the community recipe (lr 5e-4, ~3000 steps).
TEXTUAL_INVERSION_TRAIN_DEFAULTS = {"learning_rate": 5.0e-4, "max_steps": 3000}


class DreamBoothSettings(Section):
    train_text_encoder: bool = Field(False, description="Also fine-tune the whole text encoder.")
    text_encoder_lr: float | None = Field(
        None, gt=0, description="With train_text_encoder: its lr; default train.learning_rate."
    )
    text_encoder_steps: int | None = Field(
        None, ge=1, description="With train_text_encoder: freeze it after this many steps; null trains it to the end."
    )
    ema: bool = Field(False, description="Keep an exponential moving average of the trained weights (EMAModel).")
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="Per-step EMA decay, the ceiling of the warmup ramp.")
    ema_power: float | None = Field(
        0.75, gt=0, description="EMA warmup: decay = 1 - (1 + step)^-power up to ema_decay (3/4 suits runs under "
        "~100k steps, 2/3 longer ones); null uses diffusers' (1 + step) / (10 + step) ramp.",
    )
    ema_update_after_step: int = Field(0, ge=0, description="The EMA copies the weights until this step, then averages.")
    ema_update_every: int = Field(
        1, ge=1, description="Average every N steps (decay compounded to match per-step averaging)."
    )
    ema_on_cpu: bool = Field(
        False, description="Keep the EMA in CPU memory between updates: less GPU memory, two transfers per update."
    )
    use_ema_for: Literal["ema", "raw", "both"] = Field(
        "ema", description="Weights to validate and export with; 'both' validates with the EMA and exports "
        "<name>.safetensors (EMA) and <name>-raw.safetensors.",
    )
    prior_preservation: bool = Field(False, description="Train on generated class images too (prior loss).")
    class_prompt: str | None = Field(None, description="Prompt of the subject's class, e.g. 'a photo of dog'.")
    class_dir: str | None = Field(
        None, description="Class images (real or generated; missing ones are generated). Default <output.dir>/class_images."
    )
    num_class_images: int = Field(200, ge=1, description="Class images to train with (generated if missing).")
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the class-image loss (lambda).")
    class_generation_batch_size: int = Field(4, ge=1, description="Class images generated per pipeline call.")
    class_generation_steps: int = Field(30, ge=1, description="Sampling steps per generated class image.")

    @model_validator(mode="after")
    def _check(self) -> "DreamBoothSettings":
        if self.prior_preservation and not self.class_prompt:
            raise ValueError(
                "dreambooth.prior_preservation=true needs dreambooth.class_prompt: set it to the subject's class "
                "without the identifier, e.g. 'a photo of dog'"
            )
        if self.use_ema_for == "both" and not self.ema:
            raise ValueError("dreambooth.use_ema_for=both needs dreambooth.ema=true; or set use_ema_for: raw")
        return self


class RunConfig(Section):
    trainer: str
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    lora: LoraSettings | None = None
    dreambooth: DreamBoothSettings | None = None
    textual_inversion: TextualInversionSettings | None = None

    @model_validator(mode="after")
    def _method_section(self) -> "RunConfig":
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer: {self.trainer!r} is not a trainer; choose one of {', '.join(TRAINERS)}")
        if self.trainer == "lora" and self.lora is None:
            self.lora = LoraSettings()
        if self.trainer == "dreambooth":
            if self.dreambooth is None:
                self.dreambooth = DreamBoothSettings()
            if self.dreambooth.class_dir is None:
                self.dreambooth.class_dir = str(Path(self.output.dir) / "class_images")
        if self.trainer == "textual_inversion":
            self._textual_inversion_defaults()
        if self.export.blend_alpha and self.trainer != "dreambooth":
            raise ValueError(
                "export.blend_alpha blends a full fine-tune with its base and applies to trainer: dreambooth; "
                "for a LoRA, lower its strength at load time instead (e.g. <lora:name:0.7>)"
            )
        self._check_text_cache()
        return self

    def _check_text_cache(self) -> None:
        """data.cache_text_embeddings needs a text encoder that never changes; name the key that trains it."""
        if not self.data.cache_text_embeddings:
            return
        if self.trainer == "textual_inversion":
            raise ValueError(
                "data.cache_text_embeddings cannot be used with trainer: textual_inversion: it learns new rows of "
                "the text encoder's embedding table, so the text encoder's outputs change every step. "
                "Set data.cache_text_embeddings=false"
            )
        section = {"lora": self.lora, "dreambooth": self.dreambooth}.get(self.trainer)
        if section is not None and section.train_text_encoder:
            raise ValueError(
                f"data.cache_text_embeddings needs a frozen text encoder, but {self.trainer}.train_text_encoder=true "
                f"trains it, so its outputs change every step. Set {self.trainer}.train_text_encoder=false or "
                "data.cache_text_embeddings=false"
            )

    def _textual_inversion_defaults(self) -> None:
        """Fill what a TI run left unset: the section, TI's lr and steps, a caption holding the new word."""
        if self.textual_inversion is None:
            self.textual_inversion = TextualInversionSettings()
        for key, value in TEXTUAL_INVERSION_TRAIN_DEFAULTS.items():
            if key not in self.train.model_fields_set:
                setattr(self.train, key, value)
        if self.data.instance_prompt is None:
            self.data.instance_prompt = self.textual_inversion.fallback_caption()


def _valid_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts, for 'did you mean' suggestions."""
    paths = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        for arg in [info.annotation, *getattr(info.annotation, "__args__", ())]:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                paths += _valid_paths(arg, path + ".")
    return paths


def _closest(path: str) -> str:
    """' (did you mean X?)' for the valid key nearest to ``path``, or ''."""
    candidates = _valid_paths(RunConfig)
    match = difflib.get_close_matches(path, candidates, n=1, cutoff=0.6)
    if not match:
        leaf = path.rsplit(".", 1)[-1]
        same_section = [c for c in candidates if c.rsplit(".", 1)[0] == path.rsplit(".", 1)[0]]
        match = difflib.get_close_matches(leaf, [c.rsplit(".", 1)[-1] for c in same_section], n=1, cutoff=0.5)
        match = [f"{path.rsplit('.', 1)[0]}.{match[0]}"] if match and "." in path else match
    return f" (did you mean {match[0]}?)" if match else ""


def _format_validation(err: ValidationError, source: str) -> str:
    """One line per problem: the dotted key, what is wrong, and the closest valid key."""
    lines = []
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'{_closest(key)}")
        elif problem["type"] == "missing":
            lines.append(f"missing key '{key}'")
        elif not key:
            lines.append(problem["msg"].removeprefix("Value error, "))
        else:
            value = problem.get("input")
            shown = f" (got {value!r})" if not isinstance(value, dict) else ""
            lines.append(f"'{key}': {problem['msg'].removeprefix('Value error, ')}{shown}")
    return f"{source}: invalid config\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.max_steps=800`` -> (['train', 'max_steps'], 800); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: write overrides as key.sub=value (e.g. train.max_steps=800)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({err})") from err
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``key.sub=value`` into the raw config mapping."""
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with safe_load; errors give the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: YAML syntax error{where}: {err.problem}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML error: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def validate_config(data: dict, source: str = "<config>") -> RunConfig:
    """Validate a raw mapping into a RunConfig, or raise ConfigError with every problem listed."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """The config a run uses: the YAML file (if any) with command-line overrides applied."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides or [])
    return validate_config(data, str(path) if path is not None else "<overrides>")


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, every default spelled out."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
