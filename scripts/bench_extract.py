"""How much of a DreamBooth fine-tune survives as an extracted LoRA, on the toy world.

For each seed: train the shipped toy-world DreamBooth recipe (`dreambooth` entry), score its export,
then extract LoRAs from it at several ranks (UNet and text encoder, `extract_lora`), load each into the
base through diffusers' `load_lora_weights` as a user would, and score them with the same judge,
prompts and seeds. Prints a table (concept, prompt, base-prompt accuracy, kept energy, file size).

    python scripts/bench_extract.py --seeds 0,1,2 --ranks 4,8,16,32 --out runs/bench-extract
    python scripts/bench_extract.py --seeds 0,1,2 --ranks 16,32,64 --only-trigger --reuse --out runs/bench-extract
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ranks", default="4,8,16,32")
    parser.add_argument("--samples", type=int, default=32, help="images per prompt block (the benchmark's default)")
    parser.add_argument("--out", default="runs/bench-extract")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a tenth of the steps, 4 samples")
    parser.add_argument("--trigger", action="store_true",
                        help="also extract with --trigger <the recipe's word> and score it merged with merge-lora")
    parser.add_argument("--only-trigger", action="store_true", help="score only the --trigger rows (and the fine-tune)")
    parser.add_argument("--reuse", action="store_true",
                        help="score the DreamBooth runs already under --out instead of training them again")
    args = parser.parse_args()

    import torch

    from dreamtune.toyworld import benchmark as bench
    from dreamtune.toyworld.classifier import load_classifier
    from dreamtune.training.run_folder import RunFolder
    from dreamtune.weights.checkpoint import open_checkpoint
    from dreamtune.weights.diffusers_folder import read_config
    from dreamtune.weights.ldm_keys import unet_key_map
    from dreamtune.weights.lora_rank import RankChoice, extract_lora
    from dreamtune.weights.safetensors_io import save_safetensors

    def cli(argv: list[str]) -> None:
        from dreamtune.cli import main as dreamtune

        if dreamtune(argv) != 0:
            raise SystemExit(f"dreamtune {' '.join(argv)} failed")

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    judge = load_classifier(bench.CLASSIFIER_DIR)
    samples = 4 if args.quick else args.samples
    seeds = [int(s) for s in args.seeds.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    unet_map = unet_key_map(read_config(bench.MODEL_DIR, "unet"))
    rows: dict[str, list[dict]] = {}
    for seed in seeds:
        out = Path(args.out) / f"seed-{seed}"
        data = bench.write_concept_folder(out / "data" / "concept")
        if args.reuse and (out / "dreambooth" / "final").is_dir():
            final, token = out / "dreambooth" / "final", bench.TOKEN
        else:
            final, seconds, token = bench.train_entry("dreambooth", out, data, None, seed, args.quick, bench.MODEL_DIR)
        tuned = RunFolder(final.parent).diffusers

        def score(pipe) -> dict:
            measured = bench.evaluate_pipeline(pipe, judge, token, samples, seed)
            measured.pop("images")
            return {k: measured[k] for k in ("concept_fidelity", "prompt_fidelity", "base_accuracy")}

        rows.setdefault("dreambooth (full fine-tune)", []).append(
            {**score(bench.load_export("dreambooth", bench.MODEL_DIR, final)), "bytes": bench.export_size("dreambooth", final)})
        for rank in ranks:
            if not args.only_trigger:
                with open_checkpoint(bench.MODEL_DIR) as base, open_checkpoint(tuned) as fine:
                    tensors, reports, _ = extract_lora(base, fine, unet_map, RankChoice(rank=rank), text_encoder=True)
                path = save_safetensors(tensors, out / f"extracted-rank{rank}.safetensors")
                pipe = bench.load_base(bench.MODEL_DIR)
                pipe.load_lora_weights(str(path))
                energy = sum(r.energy for r in reports) / len(reports)
                rows.setdefault(f"extracted, rank {rank}", []).append(
                    {**score(pipe), "energy": energy, "bytes": Path(path).stat().st_size})
            if args.trigger or args.only_trigger:
                path, merged = out / f"extracted-rank{rank}-trigger.safetensors", out / f"merged-rank{rank}-trigger"
                report = out / f"extracted-rank{rank}-trigger.json"
                cli(["extract-lora", str(bench.MODEL_DIR), str(tuned), "--out", str(path), "--rank", str(rank),
                     "--text-encoder", "--trigger", token, "--report", str(report), "--no-hash"])
                cli(["merge-lora", str(bench.MODEL_DIR), "--lora", str(path), "--out", str(merged),
                     "--format", "diffusers", "--no-hash"])
                modules = json.loads(report.read_text())["modules"]
                rows.setdefault(f"extracted, rank {rank}, --trigger {token}, merged by merge-lora", []).append(
                    {**score(bench.load_base(merged)), "energy": sum(m["energy"] for m in modules) / len(modules),
                     "bytes": path.stat().st_size})
        print(f"seed {seed}: " + "; ".join(f"{name} {runs[-1]['concept_fidelity']:.0%}" for name, runs in rows.items()),
              flush=True)

    def mean(runs, key):
        return sum(r[key] for r in runs) / len(runs)

    lines = ["| export | concept | prompt | base prompts | mean kept energy | file size |", "|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        energy = f"{mean(runs, 'energy'):.3f}" if "energy" in runs[0] else "-"
        lines.append(f"| {name} | {mean(runs, 'concept_fidelity'):.0%} | {mean(runs, 'prompt_fidelity'):.0%} | "
                     f"{mean(runs, 'base_accuracy'):.0%} | {energy} | {mean(runs, 'bytes') / 2**20:.2f} MB |")
    table = "\n".join(lines)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps({"seeds": seeds, "samples": samples, "rows": rows},
                                                            indent=2) + "\n")
    print(f"seeds {seeds}, {samples} samples per prompt block\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
