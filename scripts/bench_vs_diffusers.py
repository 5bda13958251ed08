"""dreamtune against the diffusers example scripts, side by side: steps/s, wall time, peak memory, ratio.

Each case trains the same model on the same images for the same steps, batch, resolution, precision, rank
and target modules through dreamtune (`train.py`) and through diffusers' own example script
(`train_dreambooth_lora.py`, `train_dreambooth.py`, `textual_inversion.py`), unmodified, each run in its own
process, alternating runs over rounds (the order rotates each round). dreamtune runs twice per round: with
both caches off, and with its defaults (data.cache_latents/cache_text_embeddings auto: on where valid). Every process gets the same small timing hook (a sitecustomize module on PYTHONPATH) that stamps
each update of the training progress bar, so steps/s is measured the same way for both, from step
``--warmup`` on; on a GPU the hook synchronises at each stamp and reports the peak memory of the steps.

    python scripts/bench_vs_diffusers.py --diffusers-examples DIR       # CPU: the tiny model, 64 px
    python scripts/bench_vs_diffusers.py --diffusers-examples DIR --device cuda  # SD 1.5 geometry, 512 px,
                                                                # then scripts/bench_gpu.py's memory table

DIR holds train_dreambooth_lora.py, train_dreambooth.py and textual_inversion.py from the diffusers release
you have installed (examples/dreambooth/ and examples/textual_inversion/ of its source). Without
--diffusers-examples the script looks in the diffusers source distribution on PyPI, then clones the
matching tag. The scripts need torchvision: pass --python for a venv that has it (both sides then run there).
On CUDA each row also gets the UNet's MFU: the FLOPs of one forward and backward at the step's batch
(torch.utils.flop_counter on the meta device, no memory used) x steps/s / the GPU's peak dense fp16 FLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCRIPTS = {"lora": "train_dreambooth_lora.py", "dreambooth": "train_dreambooth.py",
           "textual_inversion": "textual_inversion.py"}
RECIPES = {"lora": "pokemon_lora.yaml", "dreambooth": "my_dog_dreambooth.yaml", "textual_inversion": "my_concept_ti.yaml"}
PROMPT, CLASS_PROMPT, TOKEN, INIT = "a photo of sks toy", "a photo of toy", "<sks>", "toy"
#: Peak dense fp16/bf16 tensor-core FLOP/s by device-name fragment (vendor data sheets); --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10G": 125.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}

HOOK = r'''
import atexit, json, os, resource, sys, time
_stamps, _peak = [], {}
def _cuda():
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None
def _install():
    import tqdm.std
    update = tqdm.std.tqdm.update
    def stamped(self, n=1):
        out = update(self, n)
        if (self.desc or "").startswith(("training", "Steps")):
            torch = _cuda()
            if torch is not None:
                torch.cuda.synchronize()
                if not _stamps:
                    torch.cuda.reset_peak_memory_stats()  # the steps' peak, not model loading's
            _stamps.append((self.n, time.perf_counter(), time.process_time()))
        return out
    tqdm.std.tqdm.update = stamped
def _write():
    torch = _cuda()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch is not None else None
    with open(os.environ["DT_BENCH_OUT"], "w") as f:
        json.dump({"stamps": _stamps, "cuda_peak_gib": peak}, f)
if os.environ.get("DT_BENCH_OUT"):
    _install()
    atexit.register(_write)
'''


def find_examples(given: str | None, workdir: Path) -> Path:
    """The folder holding the three diffusers example scripts: given, from the sdist, or from a clone."""
    def complete(folder: Path) -> bool:
        return all((folder / name).is_file() for name in SCRIPTS.values())

    if given:
        if not complete(Path(given)):
            missing = [n for n in SCRIPTS.values() if not (Path(given) / n).is_file()]
            sys.exit(f"--diffusers-examples {given}: missing {', '.join(missing)}")
        return Path(given)
    import diffusers

    version, out = diffusers.__version__, workdir / "diffusers-examples"
    out.mkdir(parents=True, exist_ok=True)
    tries = [
        [sys.executable, "-m", "pip", "download", f"diffusers=={version}", "--no-deps", "--no-binary", ":all:",
         "-d", str(workdir / "sdist")],
        ["git", "clone", "--depth", "1", "--branch", f"v{version}", "https://github.com/huggingface/diffusers",
         str(workdir / "clone")],
    ]
    for command in tries:
        if subprocess.run(command, capture_output=True, timeout=600).returncode != 0:
            continue
        for name in SCRIPTS.values():
            found = sorted(workdir.glob(f"clone/examples/*/{name}"))
            for archive in workdir.glob("sdist/*.tar.gz"):
                import tarfile

                with tarfile.open(archive) as tar:
                    members = [m for m in tar.getmembers() if m.name.endswith(f"examples/dreambooth/{name}")
                               or m.name.endswith(f"examples/textual_inversion/{name}")]
                    for member in members:
                        (out / name).write_bytes(tar.extractfile(member).read())
            if found:
                shutil.copy(found[0], out / name)
        if complete(out):
            return out
    sys.exit(f"no diffusers example scripts found for diffusers {version}: the PyPI source distribution does not "
             f"ship examples/ and the git clone failed. Copy examples/dreambooth/train_dreambooth_lora.py, "
             f"examples/dreambooth/train_dreambooth.py and examples/textual_inversion/textual_inversion.py from "
             f"the diffusers v{version} source into one folder and pass it as --diffusers-examples DIR")


def settings(device: str) -> dict:
    """The shared settings per case: CPU tiny (fp32, 64 px) or the shipped SD 1.5 recipes on CUDA."""
    gpu = device == "cuda"
    precision = "fp16" if gpu else "no"
    return {
        "lora": dict(batch=1 if gpu else 2, accumulation=4 if gpu else 1, lr=1e-4, precision=precision),
        "dreambooth": dict(batch=1, accumulation=1, lr=5e-6, precision=precision, adam8bit=gpu, checkpointing=gpu),
        "textual_inversion": dict(batch=1, accumulation=4 if gpu else 1, lr=5e-4, precision=precision),
    }


def dreamtune_command(case: str, s: dict, model: Path, data: Path, classes: Path, out: Path, steps: int,
                      resolution: int, caches: bool) -> list[str]:
    """train.py with the case's recipe, overridden to the shared settings; the caches off, or as the defaults say."""
    over = [f"model.pretrained={model}", f"data.instance_dir={data}", f"output.dir={out}", "data.dataset=null",
            f"data.resolution={resolution}", "data.center_crop=true", "data.num_workers=0",
            f"train.max_steps={steps}", f"train.batch_size={s['batch']}",
            f"train.gradient_accumulation={s['accumulation']}", f"train.learning_rate={s['lr']}",
            f"train.mixed_precision={s['precision']}", "train.lr_scheduler=constant", "train.lr_warmup_steps=0",
            "train.seed=0", "train.save_every=0", "train.resume=null", "train.snr_gamma=null",
            "validation.prompts=[]", "logging.report_to=[]"]
    if case == "lora":
        over += [f"data.instance_prompt={PROMPT}", "data.random_flip=false", "lora.rank=4", "lora.alpha=4",
                 "lora.target_modules=[to_q,to_k,to_v,to_out.0]"]
    elif case == "dreambooth":
        over += [f"data.instance_prompt={PROMPT}", "data.random_flip=false", "dreambooth.ema=false",
                 "dreambooth.train_text_encoder=false", "dreambooth.prior_preservation=true",
                 f"dreambooth.class_prompt={CLASS_PROMPT}", f"dreambooth.class_dir={classes}",
                 f"dreambooth.num_class_images={len(list(classes.iterdir()))}",
                 f"train.optimizer={'adamw8bit' if s['adam8bit'] else 'adamw'}",
                 f"train.gradient_checkpointing={str(s['checkpointing']).lower()}"]
    else:
        over += ["data.random_flip=true", f"textual_inversion.placeholder_token={TOKEN}",
                 f"textual_inversion.initializer_token={INIT}", "textual_inversion.num_vectors=1",
                 "train.scale_lr=false"]
    if not caches:  # with caches, the defaults (auto) choose them, as for a user
        over += ["data.cache_latents=none", "data.cache_text_embeddings=false"]
    return [str(REPO / "train.py"), "--config", str(REPO / "configs" / RECIPES[case]), *over]


def diffusers_command(case: str, s: dict, examples: Path, model: Path, data: Path, classes: Path, out: Path,
                      steps: int, resolution: int) -> list[str]:
    """The diffusers example script with the same settings."""
    common = ["--pretrained_model_name_or_path", str(model), "--output_dir", str(out),
              "--resolution", str(resolution), "--center_crop", "--train_batch_size", str(s["batch"]),
              "--gradient_accumulation_steps", str(s["accumulation"]), "--max_train_steps", str(steps),
              "--learning_rate", str(s["lr"]), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
              "--mixed_precision", s["precision"], "--seed", "0", "--checkpointing_steps", "1000000",
              "--dataloader_num_workers", "0", "--allow_tf32"]
    if case == "lora":
        extra = ["--instance_data_dir", str(data), "--instance_prompt", PROMPT, "--rank", "4"]
    elif case == "dreambooth":
        extra = ["--instance_data_dir", str(data), "--instance_prompt", PROMPT, "--with_prior_preservation",
                 "--class_data_dir", str(classes), "--class_prompt", CLASS_PROMPT,
                 "--num_class_images", str(len(list(classes.iterdir())))]
        extra += ["--use_8bit_adam"] * s["adam8bit"] + ["--gradient_checkpointing"] * s["checkpointing"]
    else:
        extra = ["--train_data_dir", str(data), "--learnable_property", "object", "--placeholder_token", TOKEN,
                 "--initializer_token", INIT, "--num_vectors", "1", "--save_steps", "1000000"]
    return [str(examples / SCRIPTS[case]), *common, *extra]


def run_once(argv: list[str], python: str, hook_dir: Path, out: Path, env_extra: dict) -> dict:
    """Run one training process; its wall time, peak RSS and the hook's stamps."""
    stamps = out.with_suffix(".json")
    env = {**os.environ, **env_extra, "DT_BENCH_OUT": str(stamps), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(hook_dir), str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = out.with_suffix(".log")
    started = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen([python, *argv], stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=out.parent)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0 or not stamps.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"{argv[0]} failed ({os.waitstatus_to_exitcode(status)}); log {log}:\n" + "\n".join(tail))
    hooked = json.loads(stamps.read_text())
    return {"wall_s": wall, "rss_gib": usage.ru_maxrss / 2**20, "cuda_peak_gib": hooked["cuda_peak_gib"],
            "stamps": hooked["stamps"]}


def step_rates(stamps: list, warmup: int) -> tuple[float, float]:
    """Steps per second and CPU ms per step (the process's CPU time) from the ``warmup``-th step to the last.

    CPU time is what the step's work costs whatever else the machine runs; wall-clock steps/s is what a
    user sees, and on a shared machine it also counts the time other jobs held the cores.
    """
    timed = [stamp for stamp in stamps if stamp[0] >= warmup]
    if len(timed) < 2:
        return float("nan"), float("nan")
    steps = timed[-1][0] - timed[0][0]
    return steps / (timed[-1][1] - timed[0][1]), 1000 * (timed[-1][2] - timed[0][2]) / steps


def unet_flops(model: Path, case: str, batch: int, resolution: int) -> float:
    """FLOPs of one UNet forward and backward at ``batch`` (on the meta device: shapes only, no memory)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = UNet2DConditionModel.load_config(str(model / "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    side = resolution // 8
    latents = torch.randn(batch, unet.config.in_channels, side, side, device="meta")
    hidden = torch.randn(batch, 77, unet.config.cross_attention_dim, device="meta")
    unet.requires_grad_(case == "dreambooth")  # LoRA's adapters and TI's rows add ~nothing; their base is frozen
    hidden.requires_grad_(case != "dreambooth")
    with FlopCounterMode(display=False) as counter:
        unet(latents, torch.full((batch,), 500, device="meta"), hidden).sample.float().square().mean().backward()
    return float(counter.get_total_flops())


def prepare_data(tmp: Path, resolution: int) -> tuple[Path, Path]:
    """Instance images (no caption files: the diffusers scripts read every file as an image) and class images."""
    from bench_gpu import write_images  # noqa: E402 (scripts/ is on sys.path when run as a script)

    data, classes = write_images(tmp / "images", resolution), write_images(tmp / "class", resolution)
    for txt in [*data.glob("*.txt"), *classes.glob("*.txt")]:
        txt.unlink()
    return data, classes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-examples", metavar="DIR", help="folder with the three diffusers example scripts")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--cases", default=",".join(SCRIPTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="default 60 on CPU, 40 on CUDA")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of steps/s")
    parser.add_argument("--model", help="a diffusers folder; default: the tiny model (CPU) or SD 1.5-shaped (CUDA)")
    parser.add_argument("--resolution", type=int, help="default 64 on CPU, 512 on CUDA")
    parser.add_argument("--python", default=sys.executable, help="interpreter for every run (needs torchvision)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for CPU runs")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak dense fp16 TFLOP/s for MFU")
    parser.add_argument("--json", help="also write every measurement here")
    parser.add_argument("--no-recipes", action="store_true",
                        help="on CUDA, skip scripts/bench_gpu.py (the shipped recipes' peak memory against the targets)")
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cases = [c for c in args.cases.split(",") if c]
    if unknown := [c for c in cases if c not in SCRIPTS]:
        parser.error(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(SCRIPTS)}")
    gpu = device == "cuda"
    steps, resolution = args.steps or (40 if gpu else 60), args.resolution or (512 if gpu else 64)
    env = {} if gpu else {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(args.threads)}
    peak = args.peak_tflops
    if gpu and peak is None:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    all_settings, results = settings(device), {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        examples = find_examples(args.diffusers_examples, tmp)
        (tmp / "hook").mkdir()
        (tmp / "hook" / "sitecustomize.py").write_text(HOOK)
        from dreamtune.models.tiny import save_tiny_model

        model = Path(args.model) if args.model else save_tiny_model(tmp / "model", architecture="sd15" if gpu else "tiny")
        data, classes = prepare_data(tmp, resolution)
        print(f"device {device}{' (' + torch.cuda.get_device_name() + ')' if gpu else ''}, {steps} steps, "
              f"{resolution} px, {args.rounds} rounds, diffusers scripts from {examples}", flush=True)
        for case in cases:
            s = all_settings[case]
            runners = {
                "diffusers": lambda o: diffusers_command(case, s, examples, model, data, classes, o, steps, resolution),
                "dreamtune": lambda o: dreamtune_command(case, s, model, data, classes, o, steps, resolution, False),
                "dreamtune defaults": lambda o: dreamtune_command(case, s, model, data, classes, o, steps, resolution,
                                                                  True),
            }
            names = list(runners)
            runs = {n: [] for n in names}
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    out = tmp / f"{case}-{name.replace(' ', '-')}-{r}"
                    out.mkdir()
                    result = run_once(runners[name](out / "run"), args.python, tmp / "hook", out / "run", env)
                    result["steps_per_s"], result["cpu_ms_per_step"] = step_rates(result.pop("stamps"), args.warmup)
                    runs[name].append(result)
                    print(f"  {case} / {name} round {r + 1}: {result['steps_per_s']:.2f} steps/s, "
                          f"{result['cpu_ms_per_step']:.0f} CPU ms/step, {result['wall_s']:.1f} s wall", flush=True)
            flops = unet_flops(model, case, s["batch"] * (2 if case == "dreambooth" else 1), resolution)
            results[case] = {"settings": s, "runs": runs, "unet_flops_per_micro_step": flops}
        print_table(results, gpu, peak)
    if gpu and not args.no_recipes:
        print("\nThe shipped recipes as shipped (scripts/bench_gpu.py):", flush=True)
        subprocess.run([args.python, str(REPO / "scripts" / "bench_gpu.py"), "--steps", "15"], check=False)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "steps": steps, "resolution": resolution,
                                               "results": results}, indent=2) + "\n")
    return 0


def print_table(results: dict, gpu: bool, peak: float | None) -> None:
    """One row per case and runner: medians over rounds, each round's steps/s, and the ratios to diffusers."""
    def median(rs, key):
        return statistics.median(r[key] for r in rs)

    print(f"\n| case | runner | steps/s (median) | each round | vs diffusers | CPU ms/step (median) | vs diffusers "
          f"(CPU time) | wall (median) | peak {'GPU allocated' if gpu else 'RSS'} |{' UNet MFU |' if gpu else ''}\n"
          f"|---|---|---|---|---|---|---|---|---|{'---|' if gpu else ''}")
    for case, res in results.items():
        base = res["runs"]["diffusers"]
        for name, rs in res["runs"].items():
            rate, cpu = median(rs, "steps_per_s"), median(rs, "cpu_ms_per_step")
            memory = max((r["cuda_peak_gib"] if gpu else r["rss_gib"]) or 0 for r in rs)
            each = ", ".join(format(r["steps_per_s"], ".2f") for r in rs)
            row = (f"| {case} | {name} | {rate:.2f} | {each} | {rate / median(base, 'steps_per_s'):.2f}x | {cpu:.0f} | "
                   f"{median(base, 'cpu_ms_per_step') / cpu:.2f}x | {median(rs, 'wall_s'):.1f} s | {memory:.2f} GiB |")
            if gpu:
                step_flops = res["unet_flops_per_micro_step"] * res["settings"]["accumulation"]
                row += f" {100 * step_flops * rate / (peak * 1e12):.1f}% |" if peak else " (--peak-tflops) |"
            print(row)


if __name__ == "__main__":
    raise SystemExit(main())
