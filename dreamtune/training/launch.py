"""Before anything loads: what the launch (DeepSpeed, CPU, processes) cannot run, and the Accelerator itself."""

from __future__ import annotations

import os

import torch

from ..config import RunConfig
from ..errors import ConfigError
from .run_folder import RunFolder


def refuse_impossible_launch(cfg: RunConfig) -> None:
    """Refuse, before data or models load, what cannot run under the way accelerate launched us."""
    # `accelerate launch` with a DeepSpeed config sets this; Accelerator() reads the same variable.
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    if cfg.train.optimizer in ("adamw8bit", "lion8bit"):
        raise ConfigError(
            f"train.optimizer={cfg.train.optimizer} cannot run under DeepSpeed: DeepSpeed owns the optimizer and its "
            "ZeRO partitioning does not support bitsandbytes' 8-bit state. Use train.optimizer=adamw "
            "(ZeRO-2 already shards the optimizer state) or launch without DeepSpeed."
        )
    section = cfg.method_settings
    if len(section.trained_models()) > 1:
        change = section.text_encoder_change()
        key = change[1] if change and change[1] else f"{cfg.trainer}.train_text_encoder"
        raise ConfigError(
            f"{key}=true cannot run under DeepSpeed: accelerate hands DeepSpeed one model per run, and this trains "
            f"two ({' and '.join(section.trained_models())}). Set {key}=false, "
            "or launch without DeepSpeed (e.g. --config_file configs/accelerate/multi_gpu.yaml)."
        )


def make_accelerator(cfg: RunConfig, run_folder: RunFolder):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    # A second run in the same process (tests, sweeps) may use another precision; the process
    # group itself (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    # Launched as several processes on a machine without a GPU: accelerate forms a gloo group only
    # when told the run is on the CPU.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    try:
        accelerator = Accelerator(
            cpu=multi_cpu,
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.gradient_accumulation,
            log_with=list(cfg.logging.report_to) or None,
            project_config=ProjectConfiguration(project_dir=str(run_folder.root), logging_dir=str(run_folder.logs)),
            # A method that skips whole modules at random on some steps leaves their weights without a
            # gradient on one process; DDP must then look for unused parameters or it hangs/raises.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
            if cfg.method_settings.skips_modules() else None,
        )
    except ValueError as err:
        raise ConfigError(f"train.mixed_precision={cfg.train.mixed_precision!r}: {err}") from err
    if accelerator.device.type == "cpu" and cfg.train.mixed_precision == "fp16":
        raise ConfigError(
            "train.mixed_precision=fp16 needs a GPU: PyTorch has no fp16 autocast for training on the CPU. "
            "Use train.mixed_precision=bf16 (or no) on this machine."
        )
    return accelerator
