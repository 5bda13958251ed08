"""The one training loop every method shares: accelerate, objective, checkpoints, validation, export."""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import RunConfig, dump_config
from ..data.dataset import build_dataset
from ..data.loader import build_train_loader
from ..errors import ConfigError, DreamtuneError
from ..models.dtypes import dtype_of
from ..models.loading import load_base_model
from ..models.pipeline import build_pipeline, inference_scheduler
from ..models.render import render_images, save_grid, side_by_side
from ..registry import create_method
from . import checkpoints as ckpt
from .method import TrainingMethod
from .model_card import write_model_card
from .objective import (
    latent_moments,
    min_snr_weights,
    per_sample_mse,
    prediction_target,
    sample_generators,
    sample_latents,
    sample_noise,
    sample_timesteps,
)
from .optim import build_lr_scheduler, build_optimizer
from .run_folder import RunFolder
from .step import StepContext


class TrainingDiverged(DreamtuneError, RuntimeError):
    """The loss became NaN/inf; nothing is exported from a diverged run."""

    exit_code = 1


def _diverged(what: str, step: int, checkpoints_dir: Path) -> str:
    return (
        f"{what} at step {step}; nothing was exported. The last good checkpoint is kept in {checkpoints_dir}. "
        "Try a lower train.learning_rate, train.mixed_precision=bf16 or no, or an fp32 VAE."
    )


class _Eta:
    """Time left: the remaining steps at the measured step pace, plus the validations still to come at theirs."""

    def __init__(self, max_steps: int, validation_every: int, clock=time.perf_counter):
        self.max_steps, self.every, self.clock = max_steps, validation_every, clock
        self.step_s = self.validation_s = 0.0
        self.steps = self.validations = 0
        self._mark, self._validating = clock(), 0.0

    def stepped(self) -> None:
        now = self.clock()
        self.step_s += now - self._mark - self._validating
        self.steps, self._mark, self._validating = self.steps + 1, now, 0.0

    def validated(self, seconds: float) -> None:
        self.validation_s += seconds
        self.validations += 1
        self._validating += seconds

    def remaining(self, step: int) -> float:
        left = (self.max_steps - step) * self.step_s / max(self.steps, 1)
        if self.every and self.validations:  # timed once one has run
            # From this step on every N steps before the last, then once at the end.
            to_come = (self.max_steps - 1) // self.every - (step - 1) // self.every
            left += (max(to_come, 0) + 1) * self.validation_s / self.validations
        return left

    def text(self, step: int) -> str:
        from tqdm import tqdm

        return tqdm.format_interval(self.remaining(step))


@dataclass
class RunResult:
    """Where a finished (or interrupted) run left its files."""

    output_dir: Path
    global_step: int
    exported: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    interrupted: bool = False
    last_loss: float = float("nan")


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to finish the step, checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def refuse_impossible_launch(cfg: RunConfig) -> None:
    """Refuse, before data or models load, what cannot run under the way accelerate launched us."""
    # `accelerate launch` with a DeepSpeed config sets this; Accelerator() reads the same variable.
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    if cfg.train.optimizer == "adamw8bit":
        raise ConfigError(
            "train.optimizer=adamw8bit cannot run under DeepSpeed: DeepSpeed owns the optimizer and its "
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


def _make_accelerator(cfg: RunConfig, run_folder: RunFolder):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

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
        )
    except ValueError as err:
        raise ConfigError(f"train.mixed_precision={cfg.train.mixed_precision!r}: {err}") from err
    if accelerator.device.type == "cpu" and cfg.train.mixed_precision == "fp16":
        raise ConfigError(
            "train.mixed_precision=fp16 needs a GPU: PyTorch has no fp16 autocast for training on the CPU. "
            "Use train.mixed_precision=bf16 (or no) on this machine."
        )
    return accelerator


def _flat(prefix: str, value, out: dict) -> dict:
    """Flatten the config for trackers, which accept only scalars."""
    if isinstance(value, dict):
        for key, sub in value.items():
            _flat(f"{prefix}.{key}" if prefix else key, sub, out)
    else:
        out[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class Trainer:
    """Runs one method over one config; `run()` returns a RunResult."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_folder = RunFolder(cfg.output.dir)
        self.output_dir = self.run_folder.root
        self.checkpoints_dir = self.run_folder.checkpoints
        refuse_impossible_launch(cfg)
        self.method: TrainingMethod = create_method(cfg)
        self.text_cache = None  # data.cache_text_embeddings, filled in _setup

    # -- setup --------------------------------------------------------------------------------
    def _setup(self) -> None:
        from accelerate.utils import set_seed
        from diffusers.training_utils import cast_training_params

        cfg = self.cfg
        # Data first: a broken folder fails before a multi-gigabyte model loads.
        self.dataset = build_dataset(cfg.data, seed=cfg.train.seed)
        self.accelerator = acc = _make_accelerator(cfg, self.run_folder)
        set_seed(cfg.train.seed)
        self.models = load_base_model(cfg.model)
        self.method.setup(self.models, acc)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.run_folder.config.write_text(dump_config(cfg))
            print(self.dataset.report.summary())

        trained = self.method.trained_modules()
        weight_dtype = dtype_of(cfg.train.mixed_precision)
        for name, module in self.models.components().items():
            if isinstance(module, torch.nn.Module):
                # Frozen parts run in the mixed-precision dtype: half the memory.
                lower = name not in trained and weight_dtype != torch.float32
                module.to(acc.device, dtype=weight_dtype) if lower else module.to(acc.device)
        for name, module in trained.items():
            module.to(acc.device)
            module.train()
            if cfg.train.gradient_checkpointing:
                # diffusers names it enable_gradient_checkpointing, transformers gradient_checkpointing_enable.
                enable = getattr(module, "enable_gradient_checkpointing", None) or getattr(
                    module, "gradient_checkpointing_enable", None
                )
                enable() if enable is not None else None
            # Trainable weights stay fp32 so fp16 mixed precision can unscale their gradients.
            cast_training_params(module, dtype=torch.float32)
        self.weight_dtype = weight_dtype

        lr = cfg.train.learning_rate
        if cfg.train.scale_lr:
            lr *= cfg.train.batch_size * cfg.train.gradient_accumulation * acc.num_processes
        optimizer = build_optimizer(cfg.train, self.method.parameter_groups(lr))
        lr_scheduler = build_lr_scheduler(cfg.train, optimizer, acc.num_processes)
        self.loader = build_train_loader(
            cfg.data,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            num_replicas=acc.num_processes,
            rank=acc.process_index,
            dataset=self.dataset,
            class_records=self.method.class_records(acc),
            latent_encoder=self._latent_encoder(),
            tokenizer=self.models.tokenizer,
        )
        self.text_cache = self._text_cache()
        if cfg.data.cache_latents != "none" and not cfg.validation.prompts:
            self.models.vae.to("cpu")  # every latent is cached; only validation would need it again
        if self.text_cache is not None and not cfg.validation.prompts:
            self.models.text_encoder.to("cpu")  # likewise every caption's embedding
        names = list(trained)
        prepared = acc.prepare(*[trained[n] for n in names], optimizer, lr_scheduler)
        self.trained = dict(zip(names, prepared[: len(names)]))
        self.optimizer, self.lr_scheduler = prepared[len(names)], prepared[len(names) + 1]
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._register_checkpoint_hooks()
        for extra in self.method.checkpoint_objects():
            acc.register_for_checkpointing(extra)

    def _latent_encoder(self):
        """The VAE as data.cache_latents' encoder (its scaled latent mean and std), or None when not caching."""
        if self.cfg.data.cache_latents == "none":
            return None
        from ..data.latent_cache import LatentEncoder, module_fingerprint

        vae, device = self.models.vae, self.accelerator.device

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return latent_moments(vae, pixels.to(device, dtype=vae.dtype))

        return LatentEncoder(encode, module_fingerprint(vae, {**vae.config, "dtype": str(vae.dtype)}))

    def _text_cache(self):
        """data.cache_text_embeddings: each distinct caption through the frozen text encoder once, or None."""
        if not self.cfg.data.cache_text_embeddings:
            return None
        from ..data.text_cache import TextEmbeddingCache

        m = self.models

        def encode(captions: list[str]) -> torch.Tensor:
            return self.method.encode_text(m.text_encoder, self._input_ids(captions))

        return TextEmbeddingCache(encode, sorted(self.loader.captions()))

    def _input_ids(self, captions: list[str]) -> torch.Tensor:
        """Token ids padded to the text encoder's length, on the device."""
        tokenizer = self.models.tokenizer
        return tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt",
        ).input_ids.to(self.accelerator.device)

    def _register_checkpoint_hooks(self) -> None:
        """accelerate saves optimizer/scheduler/RNG; we save only the trainable tensors ourselves."""

        def drop_model_weights(models, weights, output_dir):
            weights.clear()

        def skip_model_loading(models, input_dir):
            models.clear()

        self.accelerator.register_save_state_pre_hook(drop_model_weights)
        self.accelerator.register_load_state_pre_hook(skip_model_loading)

    def unwrapped(self) -> dict[str, torch.nn.Module]:
        return {n: self.accelerator.unwrap_model(m) for n, m in self.trained.items()}

    def _check_finite_weights(self, step: int) -> None:
        """A finite loss can still end in an inf update: never checkpoint or export NaN/inf weights."""
        if not torch.stack([torch.isfinite(p).all() for p in self.params]).all():
            raise TrainingDiverged(_diverged("the trained weights became NaN/inf", step, self.checkpoints_dir))

    # -- state ----------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, epoch: int, batches_in_epoch: int) -> Path | None:
        """Write checkpoints/step-N via a .tmp folder renamed at the end, so a kill never leaves a torn one."""
        self._check_finite_weights(step)
        acc = self.accelerator
        final = self.run_folder.checkpoint(step)
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            tmp.mkdir(parents=True, exist_ok=True)
            # Weights plus two Adam moments, with a margin for RNG/scheduler files.
            ckpt.check_free_disk(tmp, int(sum(p.numel() * 4 for p in self.params) * 3.2) + (1 << 20))
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()  # every process has written its RNG state before the folder is renamed
        if acc.is_main_process:
            tensors = {n: self.method.trainable_state_dict(n, m) for n, m in self.unwrapped().items()}
            ckpt.save_trainable(tensors, tmp)
            ckpt.write_state(tmp, {"global_step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch})
            if final.exists():
                import shutil

                shutil.rmtree(final)
            tmp.rename(final)
            ckpt.rotate(self.checkpoints_dir, self.cfg.train.checkpoints_total_limit)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, folder: Path) -> dict:
        self.accelerator.load_state(str(folder))
        ckpt.load_trainable(self.unwrapped(), folder, self.method.load_trainable_state)
        return ckpt.read_state(folder)

    # -- validation -----------------------------------------------------------------------------
    def validate(self, step: int) -> Path | None:
        """Render the validation prompts (main process) into samples/step-N.png and the trackers."""
        v = self.cfg.validation
        if not v.prompts:
            return None
        path = None
        if self.accelerator.is_main_process:
            trained = self.unwrapped()
            modules = {**self.models.components(), **trained}
            for module in trained.values():
                module.eval()
            pipe = build_pipeline(
                modules["tokenizer"], modules["text_encoder"], modules["vae"], modules["unet"],
                inference_scheduler(self.models.noise_scheduler),
            )
            with self.accelerator.autocast(), self.method.weights("sample", trained):
                rows = render_images(
                    pipe, v.prompts, images_per_prompt=v.images_per_prompt, seed=v.seed,
                    steps=v.num_inference_steps, guidance_scale=v.guidance_scale,
                    resolution=self.cfg.data.resolution, negative_prompt=v.negative_prompt,
                )
            for module in trained.values():
                module.train()
            path = save_grid(rows, self.run_folder.sample_grid(step), labels=v.prompts)
            self._log_images(rows, step)
        self.accelerator.wait_for_everyone()
        return path

    def _compare_with_base(self, final_grid: Path, step: int) -> list[Path]:
        """samples/base-vs-trained.png from the step-0 grid and the final one (main process)."""
        base_grid = self.run_folder.sample_grid(0)
        if not (self.cfg.validation.compare_with_base and self.accelerator.is_main_process and base_grid.is_file()):
            return []
        return [side_by_side(base_grid, final_grid, self.run_folder.comparison_grid,
                             ("base", f"trained ({step} steps)"))]

    def _log_images(self, rows, step: int) -> None:
        import numpy as np

        for tracker in self.accelerator.trackers:
            images = np.stack([np.asarray(img) for row in rows for img in row])
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", images, step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(img) for img in images]}, step=step)

    # -- the loop -------------------------------------------------------------------------------
    def _step_context(self, batch: dict, micro_step: int) -> StepContext:
        """Where this micro-batch sits: its step, and each local sample's place in the step's global batch.

        The sampler deals indices round-robin over processes; paired class samples (after the batch's
        ``num_instance`` instance samples) are placed after the step's every instance sample. Generators are
        keyed by (seed, step, place), so N processes or N accumulated micro-batches draw what one batch N
        times larger draws, and a resumed run draws what a straight one would.
        """
        t, acc = self.cfg.train, self.accelerator
        procs, rank = acc.num_processes, acc.process_index
        batch_len = len(batch["captions"])
        instances = batch.get("num_instance", batch_len)
        step, accumulated = divmod(micro_step, t.gradient_accumulation)
        step_total = t.batch_size * procs * t.gradient_accumulation

        def place(i: int) -> int:
            return (accumulated * t.batch_size + i) * procs + rank

        positions = [place(i) for i in range(instances)] + [step_total + place(j) for j in range(batch_len - instances)]
        return StepContext(seed=t.seed, global_step=step, micro_step=micro_step, accumulated=accumulated,
                           positions=tuple(positions), num_instance=instances,
                           generators=tuple(sample_generators(t.seed, step, positions)))

    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        """The UNet's conditioning: from the text cache, or the text encoder (without autograd while it is frozen)."""
        if self.text_cache is not None:  # data.cache_text_embeddings: the text encoder ran once, before training
            return self.text_cache.lookup(captions).to(self.accelerator.device)
        bare = self.models.text_encoder
        if any(p.requires_grad for p in bare.parameters()):
            return self.method.encode_text(self.trained.get("text_encoder", bare), self._input_ids(captions))
        # Frozen (never trained, or stopped): the bare module, as a DDP wrapper would wait for gradients.
        with torch.no_grad():
            return self.method.encode_text(bare, self._input_ids(captions))

    def _train_step(self, batch: dict, micro_step: int) -> tuple[torch.Tensor, dict]:
        """One forward/backward on a micro-batch; returns the loss and scalars to log."""
        m, acc = self.models, self.accelerator
        unet = self.trained.get("unet", m.unet)
        ctx = self._step_context(batch, micro_step)
        captions = self.method.captions(batch["captions"], ctx)
        generators = list(ctx.generators)
        if "latent_moments" in batch:  # data.cache_latents: the VAE ran once, before training
            moments = batch["latent_moments"].to(acc.device, dtype=self.weight_dtype)
        else:
            pixels = batch["pixel_values"].to(acc.device, dtype=self.weight_dtype)
            with torch.no_grad():
                moments = latent_moments(m.vae, pixels)
        latents = sample_latents(moments, generators)
        noise = sample_noise(latents, self.cfg.train.noise_offset, generators)
        timesteps = sample_timesteps(m.noise_scheduler, generators, latents.device)
        noisy = m.noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = self._encode_text(captions)
        pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
        target = prediction_target(m.noise_scheduler, latents, noise, timesteps)
        losses = per_sample_mse(pred, target)
        if self.cfg.train.snr_gamma:
            # Weights per sample, before any method splits the batch (e.g. instance vs prior).
            losses = losses * min_snr_weights(m.noise_scheduler, timesteps, self.cfg.train.snr_gamma)
        loss, scalars = self.method.loss(losses, ctx)
        return loss, {"loss": loss.detach().item(), **scalars}

    def run(self) -> RunResult:
        self._setup()
        cfg, acc = self.cfg, self.accelerator
        result = RunResult(output_dir=self.output_dir, global_step=0)
        steps_per_epoch = self.loader.batches_per_epoch() / cfg.train.gradient_accumulation  # 0: a stream
        global_step, epoch, skip_batches, accumulated = 0, 0, 0, 0
        resume_from = ckpt.resolve_resume(cfg.train.resume, self.checkpoints_dir)
        if resume_from is not None:
            state = self.load_checkpoint(resume_from)
            global_step, epoch, skip_batches = state["global_step"], state["epoch"], state["batches_in_epoch"]
            acc.print(f"resumed from {resume_from} at step {global_step}")
        elif cfg.validation.compare_with_base:
            self.validate(0)  # the untouched base, for samples/base-vs-trained.png
        if acc.is_main_process:
            acc.init_trackers(
                cfg.logging.project,
                config=_flat("", cfg.model_dump(mode="json"), {}),
                init_kwargs={"wandb": {"dir": str(self.run_folder.logs), "name": cfg.output.name}},
            )
            self._print_summary(steps_per_epoch)

        from tqdm.auto import tqdm

        progress = tqdm(
            total=cfg.train.max_steps, initial=global_step, desc="training",
            disable=not acc.is_local_main_process, dynamic_ncols=True,
            # Our ETA (in the postfix) counts the validations still to come; tqdm's would not.
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]",
        )
        eta = _Eta(cfg.train.max_steps, cfg.validation.every if cfg.validation.prompts else 0)
        started, first_step = time.perf_counter(), global_step
        micro_scalars: list[dict] = []
        stopping = False
        with _StopFlag() as stop:
            while global_step < cfg.train.max_steps and not stopping:
                self.loader.set_epoch(epoch, skip_batches)
                batches_in_epoch = skip_batches
                skip_batches = 0
                for batch in self.loader:
                    micro_step = global_step * cfg.train.gradient_accumulation + accumulated
                    with acc.accumulate(*self.trained.values()):
                        loss, scalars = self._train_step(batch, micro_step)
                        if not torch.isfinite(loss):
                            raise TrainingDiverged(_diverged(f"loss became {loss.item()}", global_step + 1,
                                                             self.checkpoints_dir))
                        acc.backward(loss)
                        if acc.sync_gradients and cfg.train.max_grad_norm > 0:
                            grad_norm = acc.clip_grad_norm_(self.params, cfg.train.max_grad_norm)
                            scalars["grad_norm"] = float(grad_norm)
                        self.optimizer.step()
                        self.lr_scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    batches_in_epoch += 1
                    accumulated += 1
                    micro_scalars.append(scalars)
                    if not acc.sync_gradients:
                        continue
                    accumulated = 0
                    scalars, stopping = self._step_scalars(micro_scalars, stop.requested)
                    micro_scalars = []
                    self.method.after_step(global_step + 1)
                    global_step += 1
                    result.last_loss = scalars["loss"]
                    eta.stepped()
                    progress.update(1)
                    progress.set_postfix(eta=eta.text(global_step), loss=f"{scalars['loss']:.4f}",
                                         lr=f"{self.lr_scheduler.get_last_lr()[0]:.2e}")
                    if global_step % cfg.logging.every == 0 or global_step == cfg.train.max_steps:
                        rate = (global_step - first_step) / max(time.perf_counter() - started, 1e-9)
                        acc.log({**scalars, **self._run_scalars(rate)}, step=global_step)
                    done = global_step >= cfg.train.max_steps
                    if cfg.train.save_every and global_step % cfg.train.save_every == 0 and not done:
                        result.checkpoints.append(self.save_checkpoint(global_step, epoch, batches_in_epoch))
                    if cfg.validation.every and global_step % cfg.validation.every == 0 and not done:
                        began = time.perf_counter()
                        if path := self.validate(global_step):
                            result.samples.append(path)
                        eta.validated(time.perf_counter() - began)
                    if done or stopping:
                        break
                else:
                    epoch += 1
        progress.close()
        result.global_step = global_step
        if stopping and global_step < cfg.train.max_steps:
            result.checkpoints.append(self.save_checkpoint(global_step, epoch, batches_in_epoch))
            result.interrupted = True
            acc.print(
                f"stopped at step {global_step}; checkpoint saved. Resume with: "
                f"train.py --config <your config> train.resume=auto output.dir={self.output_dir}"
            )
            acc.end_training()
            return result
        if path := self.validate(global_step):
            result.samples.append(path)
            result.samples += self._compare_with_base(path, global_step)
        result.exported = self._export(global_step)
        acc.end_training()
        return result

    def _export(self, step: int) -> list[Path]:
        """The method's files into final/, plus the model card; main process only."""
        self._check_finite_weights(step)
        acc = self.accelerator
        acc.wait_for_everyone()
        exported: list[Path] = []
        if acc.is_main_process:
            exporter = self.method.exporter_class(self.cfg, self.method)
            modules = self.unwrapped()
            with self.method.weights("export", modules):
                exported = exporter.write(self.run_folder.final, modules, step)
            write_model_card(self.run_folder, self.cfg, exporter, exported, step)
        acc.wait_for_everyone()
        return exported

    def _step_scalars(self, micro: list[dict], stop_requested: bool) -> tuple[dict[str, float], bool]:
        """One step's scalars, averaged over its micro-batches and all processes; and whether any process must stop."""
        keys = [k for k in micro[0] if k != "grad_norm"]  # the grad norm is already global and per step
        local = [sum(m[k] for m in micro) / len(micro) for k in keys] + [float(stop_requested)]
        acc = self.accelerator
        reduced = acc.reduce(torch.tensor(local, device=acc.device), reduction="mean").tolist()
        scalars = dict(zip(keys, reduced))
        if "grad_norm" in micro[-1]:
            scalars["grad_norm"] = micro[-1]["grad_norm"]
        # Every process stops at the same step, or the others would wait forever in the next all-reduce.
        return scalars, reduced[-1] > 0

    def _run_scalars(self, steps_per_s: float) -> dict[str, float]:
        """Learning rate per parameter group, throughput and peak memory, for the trackers."""
        t = self.cfg.train
        scalars = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        scalars["steps_per_s"] = steps_per_s
        scalars["samples_per_s"] = steps_per_s * t.batch_size * t.gradient_accumulation * self.accelerator.num_processes
        if torch.cuda.is_available():
            scalars["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            import resource

            scalars["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return scalars

    def _print_summary(self, steps_per_epoch: float) -> None:
        cfg, acc = self.cfg, self.accelerator
        trainable = sum(p.numel() for p in self.params)
        total = sum(p.numel() for m in self.models.components().values() if isinstance(m, torch.nn.Module)
                    for p in m.parameters())
        effective = cfg.train.batch_size * cfg.train.gradient_accumulation * acc.num_processes
        epochs = f"~{math.ceil(cfg.train.max_steps / steps_per_epoch)}" if steps_per_epoch else "unknown"
        print(
            f"dreamtune: {cfg.trainer} on {cfg.model.pretrained}\n"
            f"  trainable parameters {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)\n"
            f"  {len(self.dataset)} examples per epoch from {len(self.dataset.records)} images (with repeats), "
            f"{cfg.train.max_steps} steps, {epochs} epochs\n"
            f"  effective batch {effective} (batch {cfg.train.batch_size} x accumulation "
            f"{cfg.train.gradient_accumulation} x {acc.num_processes} processes), precision "
            f"{cfg.train.mixed_precision}, device {acc.device}\n"
            f"  outputs -> {self.output_dir}"
        )


def train(cfg: RunConfig) -> RunResult:
    """Train with ``cfg`` and export; the in-process entry used by the CLI and the tests."""
    return Trainer(cfg).run()
