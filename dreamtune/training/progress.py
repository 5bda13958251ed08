"""What a run reports as it goes: the ETA, the start summary, flattened config, scalars and images."""

from __future__ import annotations

import math
import time


class Eta:
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


def flat_config(prefix: str, value, out: dict) -> dict:
    """Flatten the config for trackers, which accept only scalars."""
    if isinstance(value, dict):
        for key, sub in value.items():
            flat_config(f"{prefix}.{key}" if prefix else key, sub, out)
    else:
        out[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def run_summary(cfg, accelerator, params, models, dataset, steps_per_epoch: float, output_dir) -> str:
    """The lines printed before the first step: what trains, on what data, at which batch and precision."""
    import torch

    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for m in models.components().values() if isinstance(m, torch.nn.Module)
                for p in m.parameters())
    t, procs = cfg.train, accelerator.num_processes
    effective = t.batch_size * t.gradient_accumulation * procs
    epochs = f"~{math.ceil(t.max_steps / steps_per_epoch)}" if steps_per_epoch else "unknown"
    return (
        f"dreamtune: {cfg.trainer} on {cfg.model.pretrained}\n"
        f"  trainable parameters {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)\n"
        f"  {len(dataset)} examples per epoch from {len(dataset.records)} images (with repeats), "
        f"{t.max_steps} steps, {epochs} epochs\n"
        f"  effective batch {effective} (batch {t.batch_size} x accumulation "
        f"{t.gradient_accumulation} x {procs} processes), precision {t.mixed_precision}, device {accelerator.device}\n"
        f"{cache_summary(cfg.data)}\n"
        f"  outputs -> {output_dir}"
    )


def cache_summary(data_cfg) -> str:
    """Which caches the run uses, and the rule their default (auto) follows."""
    latents = {"none": "off", "memory": "in memory", "disk": "on disk"}[data_cfg.cache_latents]
    text = "on" if data_cfg.cache_text_embeddings else "off"
    return (f"  caches: latents {latents}, text embeddings {text} (data.cache_latents / data.cache_text_embeddings; "
            "auto caches wherever crops and captions are fixed and the text encoder is frozen)")


def step_scalars(accelerator, micro: list[dict], stop_requested: bool) -> tuple[dict[str, float], bool]:
    """One step's scalars, averaged over its micro-batches and all processes; and whether any process must stop.

    Micro-step scalars may be device tensors: they are read here, once per optimizer step, so a GPU step has
    one host sync (after the optimizer step is queued) instead of one per micro-step and value.
    """
    import torch

    device = accelerator.device
    keys = [k for k in micro[0] if k != "grad_norm"]  # the grad norm is already global and per step
    # Summed in float64, as Python floats were before, so the logged values are the same to the bit.
    local = [(sum(torch.as_tensor(m[k], dtype=torch.float64, device=device) for m in micro) / len(micro)).float()
             for k in keys] + [torch.tensor(float(stop_requested), device=device)]
    if "grad_norm" in micro[-1]:  # carried along so that the step reads every device value in one sync
        local.append(torch.as_tensor(micro[-1]["grad_norm"], dtype=torch.float32, device=device))
    reduced = accelerator.reduce(torch.stack(local), reduction="mean").tolist()
    scalars = dict(zip(keys, reduced))
    if "grad_norm" in micro[-1]:
        scalars["grad_norm"] = reduced[-1]
        reduced = reduced[:-1]
    # Every process stops at the same step, or the others would wait forever in the next all-reduce.
    return scalars, reduced[-1] > 0


def run_scalars(train_cfg, optimizer, num_processes: int, steps_per_s: float) -> dict[str, float]:
    """Learning rate per parameter group (and Prodigy's d*lr), throughput and peak memory, for the trackers."""
    import torch

    t = train_cfg
    scalars = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}
    # Prodigy's lr scales the step size it estimates (d); d*lr is the rate it actually trains at.
    scalars.update({f"d*lr/{g.get('name', i)}": g["d"] * g["lr"] for i, g in enumerate(optimizer.param_groups) if "d" in g})
    scalars["steps_per_s"] = steps_per_s
    scalars["samples_per_s"] = steps_per_s * t.batch_size * t.gradient_accumulation * num_processes
    if torch.cuda.is_available():
        scalars["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        scalars["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return scalars


def log_images(trackers, rows, step: int) -> None:
    """The validation grid's images to tensorboard and wandb."""
    import numpy as np

    for tracker in trackers:
        images = np.stack([np.asarray(img) for row in rows for img in row])
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", images, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(img) for img in images]}, step=step)
