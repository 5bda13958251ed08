"""Optimizer and learning-rate schedule from the `train:` section, and schedule-free's eval weights.

Built-ins take train.adam_* where the setting means the same thing (weight decay everywhere; betas and eps
for the Adam family and Prodigy), and ``train.optimizer_args`` overrides any keyword. An import path
(``package.module.Class``) gets the parameter groups and ``optimizer_args`` only.
"""

from __future__ import annotations

import importlib
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ..config import TrainConfig
from .optimizer_settings import adafactor_relative_step
from ..errors import ConfigError

#: The pip line that installs every optional optimizer.
EXTRA = "pip install 'dreamtune[optimizers]'"

#: Prodigy's arguments where ours differ from its own defaults; train.optimizer_args overrides them.
PRODIGY_DEFAULTS = {"use_bias_correction": True, "safeguard_warmup": True}

#: Prodigy's learning rate multiplies the step size it estimates; below this, training barely moves.
PRODIGY_LOW_LR = 0.1


def _import(name: str, package: str, cfg: TrainConfig):
    """The module ``name`` (from pip package ``package``), or a ConfigError with the pip line."""
    try:
        return importlib.import_module(name)
    except Exception as err:  # bitsandbytes raises several kinds when its native library is missing
        raise ConfigError(
            f"train.optimizer={cfg.optimizer} needs the {package} package ({type(err).__name__}: {err}); "
            f"install it with {EXTRA} (or pip install {package}), or choose another train.optimizer"
        ) from err


def _from_path(path: str):
    """The optimizer class an import path names, checked to be a torch Optimizer."""
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise ConfigError(f"train.optimizer={path}: module {module_name!r} cannot be imported "
                          f"({type(err).__name__}: {err}); install the package that provides it or fix the path") from err
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"train.optimizer={path}: module {module_name!r} has no {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"train.optimizer={path} is not a torch.optim.Optimizer subclass; name an optimizer class")
    return cls


def _optimizer_class_and_defaults(cfg: TrainConfig, groups: list[dict[str, Any]]) -> tuple[type, dict[str, Any]]:
    """The class train.optimizer names and its keyword defaults from train.adam_* (before optimizer_args)."""
    adam = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    name = cfg.optimizer
    if name == "adamw":
        return torch.optim.AdamW, adam
    if name == "adamw8bit":
        return _import("bitsandbytes", "bitsandbytes", cfg).optim.AdamW8bit, adam
    if name == "lion":  # Lion's own betas (0.9, 0.99): Adam's 0.999 is not what it was tuned with
        return _import("lion_pytorch", "lion-pytorch", cfg).Lion, dict(weight_decay=cfg.adam_weight_decay)
    if name == "lion8bit":
        return _import("bitsandbytes", "bitsandbytes", cfg).optim.Lion8bit, dict(weight_decay=cfg.adam_weight_decay)
    if name == "prodigy":
        low = sorted({g["lr"] for g in groups if g["lr"] < PRODIGY_LOW_LR})
        if low:
            warnings.warn(
                f"train.optimizer=prodigy with a learning rate of {low[0]:g}: Prodigy estimates the step size itself "
                "and the learning rate only scales it; set train.learning_rate=1.0 (and any per-module lr to 1.0)",
                stacklevel=3,
            )
        # Prodigy's advice for diffusion models; without bias correction its early steps overshoot (docs/benchmarks.md).
        return _import("prodigyopt", "prodigyopt", cfg).Prodigy, {**adam, **PRODIGY_DEFAULTS}
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor, {}
    if name == "adamw_schedulefree":
        # Its warmup lives in the optimizer; the loop's schedule is then constant (see build_lr_scheduler).
        return _import("schedulefree", "schedulefree", cfg).AdamWScheduleFree, {**adam, "warmup_steps": cfg.lr_warmup_steps}
    return _from_path(name), {}


def build_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer train.optimizer names over ``groups``, in training mode (schedule-free ones)."""
    cls, kwargs = _optimizer_class_and_defaults(cfg, groups)
    kwargs.update({k: tuple(v) if isinstance(v, list) else v for k, v in cfg.optimizer_args.items()})
    if adafactor_relative_step(cfg):
        # Relative step: Adafactor computes its own step size and refuses a manual one.
        groups = [{k: v for k, v in g.items() if k != "lr"} for g in groups]
        kwargs["lr"] = None
    try:
        optimizer = _adamw(groups, kwargs, cfg) if cls is torch.optim.AdamW else cls(groups, **kwargs)
    except TypeError as err:
        raise ConfigError(f"train.optimizer_args: {cls.__name__} does not accept these arguments ({err}); "
                          f"check the names against {cls.__module__}.{cls.__name__}") from err
    if _is_schedule_free(optimizer):
        optimizer.train()
    return optimizer


def _adamw(groups: list[dict[str, Any]], kwargs: dict[str, Any], cfg: TrainConfig) -> torch.optim.Optimizer:
    """torch's AdamW with train.adamw_impl: auto is the fused kernel wherever torch has one for these parameters."""
    if cfg.adamw_impl == "auto":
        try:  # one kernel for every tensor's update (measured 11% of a tiny full fine-tune's CPU step)
            return torch.optim.AdamW(groups, **kwargs, fused=True)
        except RuntimeError:  # no fused kernel for these parameters' device or dtype
            return torch.optim.AdamW(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs, **adamw_impl_kwargs(cfg))


def adamw_impl_kwargs(cfg: TrainConfig) -> dict[str, bool]:
    """train.adamw_impl as torch.optim.AdamW's ``fused``/``foreach`` flags (auto: fused where torch has it)."""
    if cfg.adamw_impl != "auto" and cfg.optimizer != "adamw":
        raise ConfigError(f"train.adamw_impl={cfg.adamw_impl} applies to train.optimizer=adamw only "
                          f"(this run uses {cfg.optimizer}); set train.adamw_impl=auto")
    return {"auto": {"fused": True}, "fused": {"fused": True}, "foreach": {"foreach": True},
            "for_loop": {"foreach": False}}[cfg.adamw_impl]


def build_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, num_processes: int):
    """diffusers' schedules; counts are per process because accelerate steps the schedule on each.

    Adafactor's relative step reports its own step size through transformers' AdafactorSchedule (as kohya does);
    schedule-free runs at a constant rate, its warmup being inside the optimizer.
    """
    if adafactor_relative_step(cfg):
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer, initial_lr=cfg.learning_rate)
    from diffusers.optimization import get_scheduler

    schedule_free = cfg.optimizer == "adamw_schedulefree"
    return get_scheduler(
        "constant" if schedule_free else cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=0 if schedule_free else cfg.lr_warmup_steps * num_processes,
        num_training_steps=cfg.max_steps * num_processes,
    )


def _is_schedule_free(optimizer) -> bool:
    """Whether the optimizer keeps separate train and eval weights (schedule-free's train()/eval())."""
    return callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))


@contextmanager
def optimizer_eval_mode(optimizer) -> Iterator[None]:
    """Inside the block, a schedule-free optimizer's parameters hold its averaged (eval) weights; other
    optimizers are untouched. Use around sampling, held-out loss and export.

    On exit the training weights are copied back rather than recomputed: train() after eval() is a lerp
    forth and back that changes the last bits, and a resumed run must match a straight one exactly.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if not _is_schedule_free(inner):
        yield
        return
    params = [p for group in inner.param_groups for p in group["params"]]
    kept = [p.detach().to("cpu", copy=True) for p in params]  # the CPU: a full fine-tune's copy is GBs
    inner.eval()
    try:
        yield
    finally:
        inner.train()
        with torch.no_grad():
            for param, value in zip(params, kept):
                param.copy_(value)
