"""Held-out validation loss: the training objective on images the run never trains on, with fixed latents,
noise and timesteps per image, so values compare across steps, resumes and process counts.

Each image runs alone (batch 1) on the process ``index % num_processes``, and the per-image losses are summed
across processes into one vector: the same weights give the same value bit for bit, however the run is split.
"""

from __future__ import annotations

import json

import torch

from ..data.dataset import build_dataset
from .objective import latent_moments, sample_generators
from .optim import optimizer_eval_mode
from .step import StepContext

#: The generators' step slot for validation: never a training step, so its draws never repeat a training one.
STREAM = -1


def held_out_dataset(cfg):
    """validation.instance_dir read with the data section's caption rules, without random crop, flip, dropout or
    loss masks (held-out images come without masks, so their loss covers the whole image)."""
    data = cfg.data.model_copy(update={
        "instance_dir": cfg.validation.instance_dir, "sources": [], "dataset": None, "streaming": False,
        "random_flip": False, "center_crop": True, "caption_dropout": 0.0, "tag_dropout": 0.0, "shuffle_tags": False,
        "repeats": 1, "cache_latents": "none", "bucketing": False, "masked_loss": False, "mask_dir": None,
    })
    return build_dataset(data, seed=cfg.train.seed)


class ValidationLoss:
    """Computes, logs and records the held-out loss for a Trainer (every process takes part)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.dataset = held_out_dataset(trainer.cfg)
        self.values: dict[int, float] = {}

    @torch.no_grad()
    def __call__(self, step: int) -> float:
        tr = self.trainer
        acc, models, seed = tr.accelerator, tr.models, tr.cfg.train.seed
        count = len(self.dataset)
        losses = torch.zeros(count, dtype=torch.float64, device=acc.device)
        modules = tr.unwrapped()
        modes = {name: module.training for name, module in modules.items()}
        for module in modules.values():
            module.eval()
        with optimizer_eval_mode(tr.optimizer), tr.method.weights("sample", modules), acc.autocast():
            unet = modules.get("unet", models.unet)
            text_encoder = modules.get("text_encoder", models.text_encoder)
            for index in range(acc.process_index, count, acc.num_processes):
                example = self.dataset.example(index)
                generators = tuple(sample_generators(seed, STREAM, [index]))
                ctx = StepContext(seed=seed, global_step=STREAM, micro_step=STREAM, accumulated=0,
                                  positions=(index,), num_instance=1, generators=generators)
                captions = tr.method.captions([example["caption"]], ctx)
                hidden = tr.method.encode_text(text_encoder, tr._input_ids(captions))
                moments = latent_moments(models.vae, example["pixel_values"][None].to(acc.device)).to(tr.weight_dtype)
                losses[index] = tr.per_sample_losses(unet, moments, hidden, list(generators))[0].double()
        for name, module in modules.items():
            module.train(modes[name])
        if acc.num_processes > 1:
            losses = acc.reduce(losses, reduction="sum")
        value = float(losses.mean())
        self.values[step] = value
        self._record(step, value)
        return value

    def _record(self, step: int, value: float) -> None:
        """The value to the trackers, the console and logs/validation_loss.jsonl (main process)."""
        tr = self.trainer
        tr.accelerator.log({"val_loss": value}, step=step)
        if tr.accelerator.is_main_process:
            tr.run_folder.logs.mkdir(parents=True, exist_ok=True)
            with (tr.run_folder.logs / "validation_loss.jsonl").open("a") as log:
                log.write(json.dumps({"step": step, "val_loss": value}) + "\n")
            tr.accelerator.print(f"step {step}: validation loss {value:.6f} ({len(self.dataset)} held-out images)")
