"""Steps/s and peak memory of each trainer on the tiny model (CPU), one child process per trainer."""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"lora": "tiny_lora.yaml", "dreambooth": "tiny_dreambooth.yaml", "textual_inversion": "tiny_ti.yaml"}


def child(trainer: str, model: str, out: str, steps: int) -> None:
    """Run one trainer and print its timing as JSON (setup excluded from steps/s)."""
    from dreamtune.config import load_config
    from dreamtune.training.loop import Trainer

    cfg = load_config(REPO / "configs" / CONFIGS[trainer], [
        f"model.pretrained={model}", f"output.dir={out}", f"data.instance_dir={REPO / 'examples' / 'sks_toy'}",
        f"train.max_steps={steps}", "train.save_every=0", "validation.prompts=[]", "logging.report_to=[]",
    ])
    trainer_obj = Trainer(cfg)
    start = time.perf_counter()
    trainer_obj._setup()
    setup = time.perf_counter() - start
    trainer_obj._setup = lambda: None
    start = time.perf_counter()
    trainer_obj.run()
    train = time.perf_counter() - start
    print(json.dumps({"setup_s": setup, "steps_per_s": steps / train,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--child", nargs=3, metavar=("TRAINER", "MODEL", "OUT"))
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.steps)
    from dreamtune.models.tiny import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_model(Path(tmp) / "tiny")
        print("| trainer | steps/s | setup (s) | peak RSS (GiB) |\n|---|---|---|---|")
        for trainer in CONFIGS:
            run = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", trainer,
                                  str(model), str(Path(tmp) / trainer)], capture_output=True, text=True, check=True)
            r = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"| {trainer} | {r['steps_per_s']:.2f} | {r['setup_s']:.1f} | {r['peak_rss_gib']:.2f} |")


if __name__ == "__main__":
    main()
