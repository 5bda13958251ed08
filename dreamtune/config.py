"""The run config: typed sections, YAML loading, ``key.sub=value`` overrides and readable errors."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from .data.config import DataConfig
from .errors import ConfigError
from .registry import registered_methods
from .training.objective_settings import ObjectiveSettings
from .training.optimizer_settings import OptimizerSettings
from .training.speed_settings import SpeedSettings


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
    vae_dtype: Literal["fp32"] | None = Field(
        None, description="fp32 keeps the VAE in full precision under fp16/bf16 (kohya's no_half_vae); null follows "
        "train.mixed_precision.",
    )
    clip_skip: int = Field(1, ge=1, description="Condition on the text encoder's N-th layer from the end (2 = A1111's "
                           "CLIP skip 2), through its final layer norm; in training, sampling and the text cache.")


class TrainConfig(Section, ObjectiveSettings, OptimizerSettings, SpeedSettings):
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    learning_rate: float = Field(1.0e-4, gt=0)
    scale_lr: bool = Field(False, description="Multiply lr by batch size x accumulation x processes.")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables it.")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 42
    snr_gamma: float | None = Field(None, gt=0, description="Min-SNR loss weighting gamma (5.0 is usual).")
    noise_offset: float = Field(0.0, ge=0)
    gradient_checkpointing: bool = False
    save_every: int = Field(500, ge=0, description="Checkpoint cadence in steps; 0 saves none mid-run.")
    checkpoints_total_limit: int | None = Field(3, ge=1)
    resume: str | None = Field(None, description="null, 'auto' (latest checkpoint) or a checkpoint folder.")
    initial_step: int = Field(
        0, ge=0, description="Start as if N steps were done (data order, noise, lr schedule): continue from an "
        "exported file (the method's init_from key) where a checkpoint is not at hand.",
    )

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
    loss_every: int = Field(
        0, ge=0, description="Held-out loss every N steps (and before training and at the end); 0 turns it off.",
    )
    instance_dir: str | None = Field(
        None, description="Held-out images (and captions) for validation.loss_every, never trained on.",
    )
    keep_best: int = Field(
        0, ge=0, description="Also keep the N checkpoints with the lowest held-out loss through rotation.",
    )

    @model_validator(mode="after")
    def _held_out(self) -> "ValidationConfig":
        if self.loss_every and not self.instance_dir:
            raise ValueError("validation.loss_every needs validation.instance_dir: a folder of held-out images "
                             "(with captions, like data.instance_dir) the run never trains on")
        if self.keep_best and not self.loss_every:
            raise ValueError("validation.keep_best ranks checkpoints by held-out loss: set validation.loss_every "
                             "and validation.instance_dir too")
        return self


class LoggingConfig(Section):
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    project: str = "dreamtune"
    every: int = Field(10, ge=1, description="Log scalars every N steps.")


class ExportConfig(Section):
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp16", description="dtype of the single-file exports.")
    blend_alpha: list[Annotated[float, Field(ge=0, le=1)]] | None = Field(
        None,
        description="Methods that export a whole model: also write alpha*fine-tune + (1-alpha)*base single files, one per value "
        "(the Pokemon recipe's style strength); a single number is accepted.",
    )

    every_save: bool = Field(
        False, description="Also write the method's export files into each checkpoint (checkpoints/step-N/export/), "
        "so any saved step can be used without resuming; rotated with the checkpoints.",
    )
    every_save_full_model: bool = Field(
        False, description="Allow every_save for methods that export a whole model (GBs per save at SD 1.5 size).",
    )

    @field_validator("blend_alpha", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, (int, float)) else value


class OutputConfig(Section):
    dir: str = "outputs/run"
    name: str = Field("dreamtune", pattern=r"^[A-Za-z0-9._-]+$", description="Base name of exported files.")
    overwrite: bool = Field(
        False, description="Start over in a folder that holds another run (or this run's results): its files go.",
    )


class MethodSettings(Section):
    """Base of a method's own section (named as the method): its keys and its cross-section rules.

    The loop and the config core ask these questions instead of switching on the trainer's name.
    """

    #: Whether the method exports a whole model (what export.blend_alpha blends with the base).
    exports_full_model: ClassVar[bool] = False

    def apply_run_defaults(self, cfg: "RunConfig") -> None:
        """Fill keys of other sections this method has its own defaults for, where the user set none."""

    def check_run(self, cfg: "RunConfig") -> None:
        """Rules across sections; raise ValueError naming the keys and what to set."""

    def skips_modules(self) -> bool:
        """Whether some steps leave a trained module out at random (its weights then get no gradient there)."""
        return False

    def trained_models(self) -> tuple[str, ...]:
        """Which of ``unet`` and ``text_encoder`` this config trains."""
        return ("unet",)

    def text_encoder_change(self) -> tuple[str, str | None] | None:
        """Why the text encoder's outputs change during training, and the key that turns it off; None if frozen."""
        return None

    def card_settings(self) -> str:
        """Settings worth repeating on the model card, after the shared ones ('' for none)."""
        return ""


class RunConfig(Section):
    """The whole run. Each registered method adds its own optional section (see run_config_class)."""

    trainer: str
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @property
    def method_settings(self) -> MethodSettings:
        """This run's method section (``cfg.<name>`` for ``trainer: <name>``)."""
        return getattr(self, self.trainer)

    @model_validator(mode="after")
    def _method_section(self) -> "RunConfig":
        methods = registered_methods()
        if self.trainer not in methods:
            raise ValueError(f"trainer: {self.trainer!r} is not a trainer; choose one of {', '.join(sorted(methods))}")
        if getattr(self, self.trainer) is None:
            setattr(self, self.trainer, methods[self.trainer].settings())
        section = self.method_settings
        section.apply_run_defaults(self)
        if self.export.blend_alpha and not section.exports_full_model:
            full = sorted(name for name, spec in methods.items() if spec.settings.exports_full_model)
            raise ValueError(
                f"export.blend_alpha blends a full fine-tune with its base and applies to trainer: {', '.join(full)}; "
                "for an adapter or embedding, lower its strength where it is loaded instead"
            )
        if self.export.every_save and section.exports_full_model and not self.export.every_save_full_model:
            raise ValueError(
                f"export.every_save with trainer: {self.trainer} writes a whole model (GBs at SD 1.5 size) into every "
                "checkpoint; set export.every_save_full_model=true to accept that, or export.every_save=false"
            )
        v, t = self.validation, self.train
        if v.keep_best and (not t.save_every or t.save_every % v.loss_every):
            raise ValueError(f"validation.keep_best needs a held-out loss at every checkpoint: make train.save_every "
                             f"({t.save_every}) a multiple of validation.loss_every ({v.loss_every})")
        section.check_run(self)
        self.data.resolve_auto_caches(text_encoder_frozen=section.text_encoder_change() is None)
        self._check_text_cache(section)
        if self.output.overwrite and self.train.resume is not None:
            raise ValueError("output.overwrite=true starts the run over and deletes the folder's checkpoints; it "
                             "cannot be combined with train.resume. Drop one of them")
        return self

    def _check_text_cache(self, section: MethodSettings) -> None:
        """data.cache_text_embeddings needs a text encoder that never changes; name the key that trains it."""
        change = section.text_encoder_change() if self.data.cache_text_embeddings else None
        if change is None:
            return
        reason, key = change
        fix = f"Set {key}=false or data.cache_text_embeddings=false" if key else "Set data.cache_text_embeddings=false"
        raise ValueError(
            f"data.cache_text_embeddings needs a frozen text encoder, but {reason}, so the text encoder's outputs "
            f"change every step. {fix}"
        )


_RUN_CONFIG_CLASSES: dict[tuple, type[RunConfig]] = {}


def run_config_class() -> type[RunConfig]:
    """RunConfig with one optional section per registered method (``<name>: <its settings class> | None``)."""
    methods = registered_methods()
    key = tuple(sorted((name, spec.settings) for name, spec in methods.items()))
    if key not in _RUN_CONFIG_CLASSES:
        sections = {name: (Optional[spec.settings], None) for name, spec in methods.items()}
        _RUN_CONFIG_CLASSES[key] = create_model("RunConfig", __base__=RunConfig, **sections)
    return _RUN_CONFIG_CLASSES[key]


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
    candidates = _valid_paths(run_config_class())
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
        return run_config_class().model_validate(data)
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
