"""Steps/s and peak RSS of each LoRA-family type on the tiny model (configs/tiny_lora.yaml, rank 8, both models).

Each type trains in a child process for ``--steps`` steps (batch 2, 64 px, no validation, no checkpoints);
steps/s is timed inside the child from step 6 on (after start-up), peak RSS is the child's ``ru_maxrss``
from ``wait4`` (model, data and exports included), and the UI file's size is read from its export.

    python scripts/bench_lora_family.py [--steps 60] [--types lora,locon,dora,loha,lokr]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
#: type -> lora overrides; locon is LoRA with rank-8 adapters on the UNet's 3x3 convolutions.
TYPES = {
    "lora": ["lora.type=lora"],
    "locon": ["lora.type=lora", "lora.conv_rank=8", "lora.conv_alpha=8"],
    "dora": ["lora.type=dora"],
    "loha": ["lora.type=loha"],
    "lokr": ["lora.type=lokr"],
    "lora_pissa": ["lora.type=lora", "lora.init=pissa"],
}
WARMUP = 5


def child(kind: str, steps: int, model: Path, out: Path) -> None:
    """Train one type; print ``steps_per_s`` and the UI file size."""
    import torch

    from dreamtune.config import load_config
    from dreamtune.training import loop

    torch.set_num_threads(1)
    stamps: list[float] = []
    original = loop.Trainer._train_step

    def timed(self, batch, micro_step):
        result = original(self, batch, micro_step)
        stamps.append(time.perf_counter())
        return result

    loop.Trainer._train_step = timed
    cfg = load_config(REPO / "configs" / "tiny_lora.yaml", [
        f"model.pretrained={model}", f"output.dir={out}", f"data.instance_dir={REPO / 'examples' / 'sks_toy'}",
        f"train.max_steps={steps}", "train.save_every=0", "train.lr_warmup_steps=0", "validation.prompts=[]",
        "logging.report_to=[]", "lora.train_text_encoder=true", *TYPES[kind]])
    loop.Trainer(cfg).run()
    rate = (len(stamps) - 1 - WARMUP) / (stamps[-1] - stamps[WARMUP])
    size = (out / "final" / f"{cfg.output.name}.safetensors").stat().st_size
    print(f"RESULT {rate:.3f} {size}")


def measure(kind: str, steps: int, model: Path, out: Path) -> tuple[float, float, int]:
    """(steps/s, peak RSS in MiB, UI file bytes) of one child run."""
    argv = [sys.executable, __file__, "--child", kind, "--steps", str(steps), "--model", str(model), "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    _, status, usage = os.wait4(proc.pid, 0)
    output = proc.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{kind}: child failed:\n{output[-2000:]}")
    rate, size = next(line.split()[1:] for line in output.splitlines() if line.startswith("RESULT "))
    return float(rate), usage.ru_maxrss / 1024, int(size)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--child", choices=list(TYPES), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= WARMUP + 2:
        parser.error(f"--steps must be above {WARMUP + 2} (the first {WARMUP} are not timed)")
    if args.child:
        child(args.child, args.steps, Path(args.model), Path(args.out))
        return 0
    kinds = [k.strip() for k in args.types.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in TYPES]
    if unknown:
        parser.error(f"--types: unknown {unknown}; choose from {', '.join(TYPES)}")
    from dreamtune.models.tiny import save_tiny_model

    with tempfile.TemporaryDirectory(prefix="dreamtune-lora-family-") as tmp:
        model = save_tiny_model(Path(tmp) / "model", seed=0)
        print(f"| type ({args.steps} steps, batch 2, 64 px, UNet + text encoder) | steps/s | peak RSS | UI file |")
        print("|---|---|---|---|")
        for kind in kinds:
            rate, rss, size = measure(kind, args.steps, model, Path(tmp) / kind)
            print(f"| {kind} | {rate:.2f} | {rss:.0f} MiB | {size / 1e3:.1f} kB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
