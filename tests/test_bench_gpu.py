"""scripts/bench_gpu.py runs the shipped SD 1.5 recipes end to end (here on the tiny model, CPU, 64 px)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"


@pytest.mark.slow
def test_bench_gpu_runs_recipes_and_checks_mixed_precision_invariants(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_model_dir), "--resolution", "64", "--steps", "4",
         "--mixed-precision", "no", "--cases", "dreambooth,lora", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results) == {"dreambooth", "lora"}
    for case, r in results.items():
        assert r["trainable_dtypes"] == ["torch.float32"] and r["losses_finite"] and r["weights_moved"], (case, r)
        assert r["steps_per_s"] > 0
    # The DreamBooth case is the shipped recipe: 8-bit AdamW and gradient checkpointing.
    assert results["dreambooth"]["optimizer"] == "adamw8bit" and results["dreambooth"]["gradient_checkpointing"]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| dreambooth |") or line.startswith("| lora |")]
    assert len(rows) == 2 and all(row.endswith("| ok |") for row in rows), run.stdout


def test_bench_gpu_names_unknown_cases():
    run = subprocess.run([sys.executable, str(SCRIPT), "--cases", "dreambooth,lorra"], capture_output=True, text=True)
    assert run.returncode == 2 and "unknown lorra" in run.stderr
