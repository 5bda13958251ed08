"""Two processes (accelerate launch, gloo on the CPU) against one at the same global batch, for every trainer."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreamtune.config import load_config
from dreamtune.training.interrupts import EXIT_INTERRUPTED
from dreamtune.training.loop import Trainer

from .conftest import REPO_ROOT

TOLERANCE = 1e-5
LAUNCH_TIMEOUT = 300


def lora_moved(run: Path, model_dir: Path) -> float:
    """The smallest, over UNet and text encoder, of the largest lora_B entry (lora_B starts at zero)."""
    tensors = load_file(str(run / "diffusers" / "pytorch_lora_weights.safetensors"))
    return min(max(v.abs().max().item() for k, v in tensors.items() if k.startswith(part) and "lora_B" in k)
               for part in ("unet.", "text_encoder."))


def dreambooth_moved(run: Path, model_dir: Path) -> float:
    """The smallest, over UNet and text encoder, of the largest change from the base weights."""
    moved = []
    for part, name in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        tuned, base = load_file(str(run / "diffusers" / part / name)), load_file(str(model_dir / part / name))
        moved.append(max((tuned[k] - base[k]).abs().max().item() for k in base))
    return min(moved)


def ti_moved(run: Path, model_dir: Path) -> float:
    """How far the learned vectors are from every row of the base table (they start as a copy of one)."""
    base = load_file(str(model_dir / "text_encoder" / "model.safetensors"))
    table = next(v for k, v in base.items() if k.endswith("token_embedding.weight"))
    vectors = next(iter(load_file(str(run / "diffusers" / "learned_embeds.safetensors")).values()))
    return torch.cdist(vectors.float(), table.float()).min().item()


def family_moved(run: Path, model_dir: Path) -> float:
    """The largest entry of the factors that start at zero (lora_up, hada_w2_b) in the UI file."""
    tensors = load_file(str(run / "final" / "sks_toy_lora.safetensors"))
    return max(v.abs().max().item() for k, v in tensors.items() if k.endswith(("lora_up.weight", "hada_w2_b")))


def pivotal_moved(run: Path, model_dir: Path) -> float:
    """The lesser of the new rows' distance from every base row and the LoRA's largest lora_B entry."""
    base = load_file(str(model_dir / "text_encoder" / "model.safetensors"))
    table = next(v for k, v in base.items() if k.endswith("token_embedding.weight"))
    vectors = load_file(str(run / "diffusers" / "sks_toy_pivotal_emb.safetensors"))["clip_l"]
    return min(torch.cdist(vectors.float(), table.float()).min().item(), lora_moved(run, model_dir))


# trainer -> (recipe, overrides for both runs, how far training moved the exported weights)
CASES = {
    "lora": ("tiny_lora.yaml", ["lora.train_text_encoder=true", "train.gradient_accumulation=2",
                                "train.lr_warmup_steps=0", "validation.loss_every=2",
                                f"validation.instance_dir={REPO_ROOT / 'examples' / 'sks_toy'}"], lora_moved),
    "dreambooth": (
        "tiny_dreambooth.yaml",
        ["dreambooth.num_class_images=2", "dreambooth.class_generation_steps=2", "dreambooth.text_encoder_steps=2",
         "train.learning_rate=1.0e-3", "dreambooth.text_encoder_lr=1.0e-3"],
        dreambooth_moved,
    ),
    "textual_inversion": ("tiny_ti.yaml", [], ti_moved),
    "lora_dora": ("tiny_lora.yaml", ["lora.type=dora", "lora.conv_rank=2", "lora.train_text_encoder=true",
                                     "train.lr_warmup_steps=0"], family_moved),
    "lora_loha": ("tiny_lora.yaml", ["lora.type=loha", "train.lr_warmup_steps=0"], family_moved),
    # The rows stop after step 2 while the text encoder's adapters go on training.
    "pivotal": ("tiny_pivotal.yaml", ["lora.train_text_encoder=true", "pivotal.stop_fraction=0.5",
                                      "train.lr_warmup_steps=0"], pivotal_moved),
}


def written(out: Path) -> list[str]:
    """Every file under ``out``; tensorboard's event files as one token each, its time-named folders as <time>."""
    files = [p for p in out.rglob("*") if p.is_file()]
    return sorted("<events>" if p.name.startswith("events.out.tfevents.")
                  else re.sub(r"/\d+\.\d+/", "/<time>/", p.relative_to(out).as_posix()) for p in files)


def logged(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> (step, value) from the one event file that holds the scalars; timings and memory left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = []
    for events in (out / "logs").rglob("events.out.tfevents.*"):
        reader = EventAccumulator(str(events), size_guidance={"scalars": 0})
        reader.Reload()
        tags = [t for t in reader.Tags()["scalars"] if t not in ("steps_per_s", "samples_per_s", "peak_memory_gb")]
        if tags:
            found.append({t: [(e.step, e.value) for e in reader.Scalars(t)] for t in tags})
    assert len(found) == 1, f"{len(found)} event files log scalars"
    return found[0]


def launch_two(config: Path, *overrides: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch`` train.py on two CPU processes (gloo)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO_ROOT / "train.py"), "--config", str(config), *overrides,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the launcher passes SIGTERM on to the workers and kills them after a grace period
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"two-process run still running after {LAUNCH_TIMEOUT} s (a deadlock?):\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", list(CASES))
def test_two_processes_match_one_process_at_the_same_global_batch(trainer, tiny_model_dir, tmp_path):
    """2 processes x batch 1 == 1 process x batch 2: same exported weights and logged loss; files written once."""
    recipe, overrides, moved = CASES[trainer]
    common = [
        f"model.pretrained={tiny_model_dir}", f"data.instance_dir={REPO_ROOT / 'examples' / 'sks_toy'}",
        "data.resolution=32", "train.max_steps=4", "train.save_every=2", "train.checkpoints_total_limit=2",
        "validation.every=0", "validation.num_inference_steps=2", "validation.images_per_prompt=1",
        "logging.report_to=[tensorboard]", "logging.every=1", "export.dtype=fp32",
        # Adam turns a rounding-level difference in a near-zero gradient into a whole lr step; a larger eps
        # keeps each update proportional to its gradient, so the comparison measures the gradients.
        "train.adam_epsilon=1.0e-4", *overrides,
    ]
    if trainer == "dreambooth":  # the two-process run generates the class images (one each), the other reuses them
        common.append(f"dreambooth.class_dir={tmp_path / 'class_images'}")
    config = REPO_ROOT / "configs" / recipe
    two, one = tmp_path / "two", tmp_path / "one"
    run = launch_two(config, f"output.dir={two}", "train.batch_size=1", *common, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    Trainer(load_config(config, [f"output.dir={one}", "train.batch_size=2", *common])).run()

    # Only the main process prints and writes: one summary, one result, the same files as one process
    # (plus the second process's RNG state in each checkpoint).
    accumulation = load_config(config, common).train.gradient_accumulation
    assert run.stdout.count("trainable parameters") == 1 and run.stdout.count("done: 4 steps") == 1, run.stdout
    epochs = math.ceil(4 * 2 * accumulation / 6)  # 4 steps of 2 x accumulation images, 6 images
    assert f"4 steps, ~{epochs} epochs" in run.stdout
    assert f"(batch 1 x accumulation {accumulation} x 2 processes)" in run.stdout
    second_rng = "checkpoints/step-000002/random_states_1.pkl"
    assert second_rng in written(two)
    assert [f for f in written(two) if f != second_rng] == written(one)

    # Logged at global steps 1..4; loss terms averaged over both processes' samples, the same grad norm and lr.
    two_logged, one_logged = logged(two), logged(one)
    assert {"loss", "grad_norm"} <= two_logged.keys() and two_logged.keys() == one_logged.keys()
    held_out = {run: [json.loads(line) for line in (run / "logs" / "validation_loss.jsonl").read_text().splitlines()]
                for run in (two, one) if (run / "logs" / "validation_loss.jsonl").is_file()}
    if held_out:  # the same weights (the base, at step 0) give the same held-out loss bit for bit
        assert [r["step"] for r in held_out[two]] == [r["step"] for r in held_out[one]] == [0, 2, 4]
        assert held_out[two][0]["val_loss"] == held_out[one][0]["val_loss"]
        assert [r["val_loss"] for r in held_out[two]] == pytest.approx([r["val_loss"] for r in held_out[one]], rel=1e-5)
        assert [step for step, _ in two_logged.pop("val_loss")] == [0, 2, 4] and one_logged.pop("val_loss")
    for tag, series in two_logged.items():
        assert [step for step, _ in series] == [1, 2, 3, 4], tag
        assert [v for _, v in series] == pytest.approx([v for _, v in one_logged[tag]], rel=1e-5), tag

    exported = sorted(p.relative_to(one).as_posix() for folder in ("final", "diffusers")
                      for p in (one / folder).rglob("*.safetensors"))
    worst = {}
    for name in exported:
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert a.keys() == b.keys(), name
        worst[name] = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert max(worst.values()) < TOLERANCE, f"two processes differ from one: {worst}"
    assert moved(one, tiny_model_dir) > 20 * TOLERANCE, "training barely moved the weights: a vacuous match"


# Imported by every Python process started with its folder on PYTHONPATH: the second process alone gets
# SIGTERM during its second micro-step, as when a scheduler or a user signals one worker.
SIGTERM_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import signal
    from dreamtune.training import loop

    original, calls = loop.Trainer._train_step, []

    def step_then_signal(self, batch, micro_step):
        calls.append(micro_step)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, micro_step)

    loop.Trainer._train_step = step_then_signal
"""


@pytest.mark.slow
def test_a_stop_on_one_process_stops_both_at_the_same_step_and_resumes(tiny_model_dir, tmp_path):
    """SIGTERM to one worker: both checkpoint step 2 and exit EXIT_INTERRUPTED (no deadlock; the launcher then
    fails with its own code); a two-process resume finishes."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SIGTERM_RANK_1)
    config = REPO_ROOT / "configs" / "tiny_lora.yaml"
    out = tmp_path / "out"
    common = [
        f"model.pretrained={tiny_model_dir}", f"data.instance_dir={REPO_ROOT / 'examples' / 'sks_toy'}",
        f"output.dir={out}", "data.resolution=32", "train.max_steps=4", "train.save_every=0", "train.batch_size=1",
        "validation.prompts=[]", "logging.report_to=[]",
    ]
    stopped = launch_two(config, *common, cwd=tmp_path, env={"PYTHONPATH": f"{hook}{os.pathsep}{REPO_ROOT}"})
    assert stopped.returncode != 0, stopped.stderr[-3000:]
    assert stopped.stderr.count(f"exitcode  : {EXIT_INTERRUPTED} ") == 2, stopped.stderr[-3000:]
    assert stopped.stdout.count("stopped at step 2; checkpoint saved. Resume with:") == 1, stopped.stdout
    checkpoint = out / "checkpoints" / "step-000002"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert not (out / "final").exists()

    resumed = launch_two(config, *common, "train.resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resumed from") == 1 and resumed.stdout.count("done: 4 steps") == 1, resumed.stdout
    assert (out / "final" / "sks_toy_lora.safetensors").is_file()


@pytest.mark.slow
def test_module_dropout_trains_on_two_processes(tiny_model_dir, tmp_path):
    """lora.module_dropout skips a module on one process only: DDP must accept its missing gradients."""
    run = launch_two(REPO_ROOT / "configs" / "tiny_lora.yaml", f"model.pretrained={tiny_model_dir}",
                     f"data.instance_dir={REPO_ROOT / 'examples' / 'sks_toy'}", "data.resolution=32",
                     f"output.dir={tmp_path / 'out'}", "train.max_steps=4", "train.batch_size=1", "train.save_every=0",
                     "validation.prompts=[]", "logging.report_to=[]", "lora.type=loha", "lora.module_dropout=0.5",
                     "lora.rank_dropout=0.2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "out" / "final" / "sks_toy_lora.safetensors").is_file()
