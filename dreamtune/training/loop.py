"""The one training loop every method shares: accelerate, objective, checkpoints, validation, export."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import RunConfig
from ..data.dataset import build_dataset
from ..data.loader import build_train_loader
from ..models.loading import load_base_model
from ..models.pipeline import build_pipeline, inference_scheduler
from ..models.render import render_images, save_grid, side_by_side
from ..models.text import check_clip_skip, token_ids
from ..registry import create_method
from . import checkpoints as ckpt
from . import saving
from .method import TrainingMethod
from .objective import Objective, latent_moments, training_scheduler
from .caches import latent_encoder, text_cache
from .launch import make_accelerator, refuse_impossible_launch
from .initial_step import start_at
from .optim import build_lr_scheduler, build_optimizer, optimizer_eval_mode
from .precision import place_models
from .interrupts import ForcedStop, RunStopped, StopFlag, any_process, forced_stop_message
from .ownership import RunOwnership
from .progress import Eta, flat_config, log_images, run_scalars, run_summary, step_scalars
from .run_folder import RunFolder
from .speed import apply_speed_settings
from .step import step_context
from .outcome import RunResult, TrainingDiverged, diverged_message, stop_if_diverged
from .validation_loss import ValidationLoss


class Trainer:
    """Runs one method over one config; `run()` returns a RunResult."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_folder = RunFolder(cfg.output.dir)
        self.output_dir = self.run_folder.root
        self.checkpoints_dir = self.run_folder.checkpoints
        refuse_impossible_launch(cfg)
        self.ownership = RunOwnership(self.run_folder, cfg)
        self.stop = StopFlag()
        self._safe_point: tuple[int, int, int] | None = None  # (step, epoch, batch) while weights match a step
        self.method: TrainingMethod = create_method(cfg)
        self.text_cache = None  # data.cache_text_embeddings, filled in _setup

    # -- setup --------------------------------------------------------------------------------
    def _setup(self) -> None:
        from accelerate.utils import set_seed

        cfg = self.cfg
        # Data first: a broken folder fails before a multi-gigabyte model loads.
        self.dataset = build_dataset(cfg.data, seed=cfg.train.seed)
        self.validation_loss = ValidationLoss(self) if cfg.validation.loss_every else None
        self.accelerator = acc = make_accelerator(cfg, self.run_folder)
        self.ownership.check()  # every process, before the model loads: writable, unlocked, this run's folder
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.ownership.claim()
            print(self.dataset.report.summary())
        acc.wait_for_everyone()
        set_seed(cfg.train.seed)
        self.models = load_base_model(cfg.model)
        self.models.noise_scheduler = training_scheduler(self.models.noise_scheduler, cfg.train.zero_terminal_snr)
        self.objective = Objective(self.models.noise_scheduler, cfg.train, cfg.data.unmasked_weight)
        self.method.setup(self.models, acc)

        trained = self.method.trained_modules()
        check_clip_skip(self.models.text_encoder, cfg.model.clip_skip)
        self.weight_dtype = place_models(cfg, self.models.components(), trained, acc.device)
        for name, module in trained.items():
            module.train()
            if cfg.train.gradient_checkpointing:
                # diffusers names it enable_gradient_checkpointing, transformers gradient_checkpointing_enable.
                enable = getattr(module, "enable_gradient_checkpointing", None) or getattr(
                    module, "gradient_checkpointing_enable", None
                )
                enable() if enable is not None else None
        apply_speed_settings(cfg.train, self.models.unet, acc.device)

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
            latent_encoder=latent_encoder(cfg.data, self.models.vae, acc.device),
            tokenizer=self.models.tokenizer,
        )
        self.text_cache = text_cache(
            cfg.data, lambda captions: self.method.encode_text(self.models.text_encoder, self._input_ids(captions)),
            self.loader)
        validating = cfg.validation.prompts or cfg.validation.loss_every
        if cfg.data.cache_latents != "none" and not validating:
            self.models.vae.to("cpu")  # every latent is cached; only validation would need it again
        if self.text_cache is not None and not validating:
            self.models.text_encoder.to("cpu")  # likewise every caption's embedding
        names = list(trained)
        prepared = acc.prepare(*[trained[n] for n in names], optimizer, lr_scheduler)
        self.trained = dict(zip(names, prepared[: len(names)]))
        self.optimizer, self.lr_scheduler = prepared[len(names)], prepared[len(names) + 1]
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._register_checkpoint_hooks()
        for extra in self.method.checkpoint_objects():
            acc.register_for_checkpointing(extra)

    def _input_ids(self, captions: list[str]) -> torch.Tensor:
        """Token ids padded to the text encoder's length (in windows, for data.max_token_length), on the device."""
        return token_ids(self.models.tokenizer, captions, self.cfg.data.max_token_length).to(self.accelerator.device)

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
            raise TrainingDiverged(diverged_message("the trained weights became NaN/inf", step, self.checkpoints_dir))

    # -- state ----------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, epoch: int, batches_in_epoch: int) -> Path:
        """checkpoints/step-N, written whole or not at all (see training/saving.py)."""
        return saving.save_checkpoint(self, step, epoch, batches_in_epoch)

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
            with optimizer_eval_mode(self.optimizer), self.accelerator.autocast(), \
                    self.method.weights("sample", trained):
                rows = render_images(
                    pipe, v.prompts, images_per_prompt=v.images_per_prompt, seed=v.seed,
                    steps=v.num_inference_steps, guidance_scale=v.guidance_scale,
                    resolution=self.cfg.data.resolution, negative_prompt=v.negative_prompt,
                    stop=lambda: self.stop.requested, encode=self._sampling_encoder(modules["text_encoder"]),
                )
            for module in trained.values():
                module.train()
            if self.stop.requested:  # a Ctrl-C cut the grid short: the run stops and checkpoints instead
                self.accelerator.wait_for_everyone()
                return None
            path = save_grid(rows, self.run_folder.sample_grid(step), labels=v.prompts)
            log_images(self.accelerator.trackers, rows, step)
        self.accelerator.wait_for_everyone()
        return path

    def _sampling_encoder(self, text_encoder):
        """The training's text encoding for the pipeline when it differs from diffusers' own (clip skip, long captions)."""
        if self.cfg.model.clip_skip == 1 and self.cfg.data.max_token_length == 75:
            return None
        return lambda text: self.method.encode_text(text_encoder, self._input_ids([text]))

    def _compare_with_base(self, final_grid: Path, step: int) -> list[Path]:
        """samples/base-vs-trained.png from the step-0 grid and the final one (main process)."""
        base_grid = self.run_folder.sample_grid(0)
        if not (self.cfg.validation.compare_with_base and self.accelerator.is_main_process and base_grid.is_file()):
            return []
        return [side_by_side(base_grid, final_grid, self.run_folder.comparison_grid,
                             ("base", f"trained ({step} steps)"))]

    # -- the loop -------------------------------------------------------------------------------
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

    def per_sample_losses(self, unet, moments: torch.Tensor, hidden: torch.Tensor, generators,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
        """The objective per sample (training/objective.py); ``mask`` weights where each sample's loss counts."""
        return self.objective.losses(unet, moments, hidden, generators, mask)

    def _train_step(self, batch: dict, micro_step: int) -> tuple[torch.Tensor, dict]:
        """One forward/backward on a micro-batch; returns the loss and scalars to log."""
        m = self.models
        unet = self.trained.get("unet", m.unet)
        t, acc = self.cfg.train, self.accelerator
        ctx = step_context(t.seed, micro_step, len(batch["captions"]), batch.get("num_instance"),
                           batch_size=t.batch_size, accumulation=t.gradient_accumulation,
                           num_processes=acc.num_processes, rank=acc.process_index)
        captions = self.method.captions(batch["captions"], ctx)
        generators = list(ctx.generators)
        if "latent_moments" in batch:  # data.cache_latents: the VAE ran once, before training
            moments = batch["latent_moments"].to(acc.device, dtype=self.weight_dtype)
        else:
            with torch.no_grad():
                moments = latent_moments(m.vae, batch["pixel_values"].to(acc.device)).to(self.weight_dtype)
        hidden = self._encode_text(captions)
        losses = self.per_sample_losses(unet, moments, hidden, generators, batch.get("mask"))
        loss, scalars = self.method.loss(losses, ctx)
        return loss, {"loss": loss.detach(), **scalars}  # tensors: read once per step, in step_scalars

    def run(self) -> RunResult:
        """Set up, train, validate and export; a second Ctrl-C ends it with RunStopped (EXIT_INTERRUPTED)."""
        try:
            self._setup()
            with self.stop:
                return self._train()
        except ForcedStop:
            raise RunStopped(forced_stop_message(self)) from None
        finally:
            self.ownership.release()

    def _stopped(self, result: RunResult, step: int, epoch: int, batches_in_epoch: int) -> RunResult:
        """A first Ctrl-C/SIGTERM: checkpoint, say how to resume, export nothing."""
        result.checkpoints.append(saving.checkpoint_on_stop(self, step, epoch, batches_in_epoch))
        result.interrupted = True
        self.accelerator.print(
            f"stopped at step {step}; checkpoint saved. Resume with: "
            f"train.py --config <your config> train.resume=auto output.dir={self.output_dir}"
        )
        self.accelerator.end_training()
        return result

    def _train(self) -> RunResult:
        cfg, acc = self.cfg, self.accelerator
        result = RunResult(output_dir=self.output_dir, global_step=0)
        steps_per_epoch = self.loader.batches_per_epoch() / cfg.train.gradient_accumulation  # 0: a stream
        global_step, epoch, skip_batches, accumulated = 0, 0, 0, 0
        resume_from = ckpt.resolve_resume(cfg.train.resume, self.checkpoints_dir, self.ownership.fingerprint)
        if resume_from is not None:
            state = self.load_checkpoint(resume_from)
            global_step, epoch, skip_batches = state["global_step"], state["epoch"], state["batches_in_epoch"]
            acc.print(f"resumed from {resume_from} at step {global_step}")
        elif cfg.train.initial_step:
            global_step, epoch, skip_batches = start_at(self, cfg.train.initial_step)
        elif cfg.validation.compare_with_base:
            self.validate(0)  # the untouched base, for samples/base-vs-trained.png
        batches_in_epoch = skip_batches
        if acc.is_main_process:
            acc.init_trackers(
                cfg.logging.project,
                config=flat_config("", cfg.model_dump(mode="json"), {}),
                init_kwargs={"wandb": {"dir": str(self.run_folder.logs), "name": cfg.output.name}},
            )
            print(run_summary(cfg, acc, self.params, self.models, self.dataset, steps_per_epoch, self.output_dir))
        if self.validation_loss is not None and resume_from is None:
            self.validation_loss(global_step)  # where the curve starts: the base, or the file it continues

        from tqdm.auto import tqdm

        progress = tqdm(
            total=cfg.train.max_steps, initial=global_step, desc="training",
            disable=not acc.is_local_main_process, dynamic_ncols=True,
            # Our ETA (in the postfix) counts the validations still to come; tqdm's would not.
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]",
        )
        eta = Eta(cfg.train.max_steps, cfg.validation.every if cfg.validation.prompts else 0)
        started, first_step = time.perf_counter(), global_step
        micro_scalars: list[dict] = []
        stopping, stop = False, self.stop
        while global_step < cfg.train.max_steps and not stopping:
            self.loader.set_epoch(epoch, skip_batches)
            batches_in_epoch = skip_batches
            skip_batches = 0
            for batch in self.loader:
                micro_step = global_step * cfg.train.gradient_accumulation + accumulated
                with acc.accumulate(*self.trained.values()):
                    loss, scalars = self._train_step(batch, micro_step)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.train.max_grad_norm > 0:
                        scalars["grad_norm"] = acc.clip_grad_norm_(self.params, cfg.train.max_grad_norm).detach()
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                batches_in_epoch += 1
                accumulated += 1
                micro_scalars.append(scalars)
                if not acc.sync_gradients:
                    continue
                accumulated = 0
                # The step's one host sync; a NaN loss stops the run here, before any hook, save or export.
                scalars, stopping = step_scalars(acc, micro_scalars, stop.requested)
                stop_if_diverged(scalars["loss"], global_step + 1, self.checkpoints_dir)
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
                    acc.log({**scalars, **run_scalars(cfg.train, self.optimizer, acc.num_processes, rate)}, step=global_step)
                done = global_step >= cfg.train.max_steps
                if self.validation_loss is not None and global_step % cfg.validation.loss_every == 0 and not done:
                    self.validation_loss(global_step)  # before the checkpoint, which records it
                if cfg.train.save_every and global_step % cfg.train.save_every == 0 and not done:
                    if saved := saving.checkpoint_or_warn(self, global_step, epoch, batches_in_epoch):
                        result.checkpoints.append(saved)
                if cfg.validation.every and global_step % cfg.validation.every == 0 and not done:
                    began = time.perf_counter()
                    self._safe_point = (global_step, epoch, batches_in_epoch)
                    if path := self.validate(global_step):
                        result.samples.append(path)
                    self._safe_point = None
                    eta.validated(time.perf_counter() - began)
                    stopping = any_process(acc, stop.requested)
                if done or stopping:
                    break
            else:
                epoch += 1
        progress.close()
        result.global_step = global_step
        if stopping and global_step < cfg.train.max_steps:
            return self._stopped(result, global_step, epoch, batches_in_epoch)
        self._safe_point = (global_step, epoch, batches_in_epoch)
        if self.validation_loss is not None:
            self.validation_loss(global_step)
            result.validation_losses = dict(self.validation_loss.values)
        if path := self.validate(global_step):
            result.samples.append(path)
            result.samples += self._compare_with_base(path, global_step)
        if any_process(acc, stop.requested):  # a Ctrl-C during the last validation: checkpoint, no export
            return self._stopped(result, global_step, epoch, batches_in_epoch)
        self._check_finite_weights(global_step)
        acc.wait_for_everyone()
        result.exported, result.ui_file = saving.export_final(self, global_step, epoch, batches_in_epoch)
        self._safe_point = None
        acc.end_training()
        return result


def train(cfg: RunConfig) -> RunResult:
    """Train with ``cfg`` and export; the in-process entry used by the CLI and the tests."""
    return Trainer(cfg).run()
