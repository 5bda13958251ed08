"""CLIP-T, CLIP-I and DINO on tiny random CLIP and ViT models built locally; `dreamtune evaluate` output and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamtune.cli import main
from dreamtune.evaluation import EvaluationError, evaluate


@pytest.fixture(scope="session")
def metric_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random CLIP (with the tiny CLIP BPE tokenizer) and ViT folders, saved with their processors."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, ViTConfig,
                              ViTImageProcessor, ViTModel)

    from dreamtune.models.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("metric-models")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16,
    ))
    clip.save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(root / "clip")
    torch.manual_seed(1)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4))
    vit.save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    assert (root / "clip" / "model.safetensors").is_file() and (root / "dino" / "model.safetensors").is_file()
    return {"clip": root / "clip", "dino": root / "dino"}


def _noise(seed: int, size: int = 40) -> Image.Image:
    """A random RGB image: different seeds give clearly different embeddings."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _folder(path: Path, seeds: list[int], prompts: list[str] | None = None) -> Path:
    """Write img_NN.png from ``seeds`` (and a .txt sidecar each when ``prompts`` is given)."""
    path.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(seeds):
        _noise(seed).save(path / f"img_{index:02d}.png")
        if prompts is not None:
            (path / f"img_{index:02d}.txt").write_text(prompts[index] + "\n")
    return path


def _score(models, images, reference=None, prompts=None, metrics="clip_t,clip_i,dino") -> dict:
    return evaluate(images, reference=reference, prompts=prompts, metrics=metrics, clip_model=str(models["clip"]),
                    dino_model=str(models["dino"]), device="cpu")


PROMPTS = ["a red circle on a white background", "a photo of sks dog on the beach", "a blue square, top left"]


def test_identical_images_score_one_and_different_images_less(metric_models, tmp_path):
    same = _folder(tmp_path / "gen", [7, 7, 7])
    ref = _folder(tmp_path / "ref", [7, 7])
    result = _score(metric_models, same, ref, metrics="clip_i,dino")
    assert list(result["metrics"]) == ["clip_i", "dino"]
    assert result["metrics"]["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert result["metrics"]["dino"] == pytest.approx(1.0, abs=1e-5)
    assert result["images"] == 3 and result["reference"] == 2
    assert set(result["per_image"]["dino"]) == {"img_00.png", "img_01.png", "img_02.png"}

    other = _folder(tmp_path / "other", [1, 2, 3])
    different = _score(metric_models, other, ref, metrics="clip_i,dino")["metrics"]
    assert different["clip_i"] < 1 - 1e-4 and different["dino"] < 1 - 1e-4


def test_pair_metrics_average_every_generated_reference_pair(metric_models, tmp_path):
    # Generated [a, b] vs reference [a]: a scores 1, b scores cos(a, b); the mean is their average.
    gen = _folder(tmp_path / "gen", [3, 4])
    ref = _folder(tmp_path / "ref", [3])
    result = _score(metric_models, gen, ref, metrics="dino")
    per_image = result["per_image"]["dino"]
    assert per_image["img_00.png"] == pytest.approx(1.0, abs=1e-5)
    assert per_image["img_01.png"] < 1 - 1e-4
    assert result["metrics"]["dino"] == pytest.approx((1.0 + per_image["img_01.png"]) / 2, abs=1e-6)

    from transformers import ViTImageProcessor, ViTModel

    model = ViTModel.from_pretrained(metric_models["dino"]).eval()
    processor = ViTImageProcessor.from_pretrained(metric_models["dino"])
    with torch.no_grad():
        cls = model(**processor(images=[_noise(3), _noise(4)], return_tensors="pt")).last_hidden_state[:, 0]
    expected = torch.nn.functional.cosine_similarity(cls[0], cls[1], dim=0)
    assert per_image["img_01.png"] == pytest.approx(float(expected), abs=1e-5)


def test_clip_t_matches_a_cosine_computed_by_hand(metric_models, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    gen = _folder(tmp_path / "gen", [11, 12, 13], prompts=PROMPTS)
    result = _score(metric_models, gen, metrics="clip_t")

    model = CLIPModel.from_pretrained(metric_models["clip"]).eval()
    processor = CLIPProcessor.from_pretrained(metric_models["clip"])
    with torch.no_grad():
        pixels = processor(images=[_noise(12)], return_tensors="pt")["pixel_values"]
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)[0]
        ids = processor.tokenizer([PROMPTS[1]], return_tensors="pt")["input_ids"]
        text = model.text_projection(model.text_model(input_ids=ids).pooler_output)[0]
    expected = float(image @ text / (image.norm() * text.norm()))
    assert result["per_image"]["clip_t"]["img_01.png"] == pytest.approx(expected, abs=1e-5)
    assert result["prompts"]["img_01.png"] == PROMPTS[1]
    assert result["metrics"]["clip_t"] == pytest.approx(np.mean(list(result["per_image"]["clip_t"].values())))


def test_prompt_sources_agree_sidecars_text_file_and_jsonl(metric_models, tmp_path):
    gen = _folder(tmp_path / "gen", [21, 22, 23], prompts=PROMPTS)
    lines = tmp_path / "prompts.txt"
    lines.write_text("\n".join(PROMPTS) + "\n\n")
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"file_name": f"img_{i:02d}.png", "prompt": p}) + "\n"
                            for i, p in reversed(list(enumerate(PROMPTS)))))
    by_sidecar = _score(metric_models, gen, metrics="clip_t")["per_image"]["clip_t"]
    assert _score(metric_models, gen, prompts=lines, metrics="clip_t")["per_image"]["clip_t"] == by_sidecar
    assert _score(metric_models, gen, prompts=rows, metrics="clip_t")["per_image"]["clip_t"] == by_sidecar
    # The prompt decides the score: swapping two lines changes those images' values.
    lines.write_text("\n".join([PROMPTS[1], PROMPTS[0], PROMPTS[2]]))
    swapped = _score(metric_models, gen, prompts=lines, metrics="clip_t")["per_image"]["clip_t"]
    assert swapped["img_00.png"] != pytest.approx(by_sidecar["img_00.png"], abs=1e-6)
    assert swapped["img_02.png"] == pytest.approx(by_sidecar["img_02.png"], abs=1e-6)


def test_input_errors_name_the_problem_before_any_model_loads(tmp_path):
    gen = _folder(tmp_path / "gen", [1, 2], prompts=PROMPTS[:2])
    (tmp_path / "empty").mkdir()
    never = {"clip_model": str(tmp_path / "no-clip"), "dino_model": str(tmp_path / "no-dino")}
    with pytest.raises(EvaluationError, match=r"unknown metric 'fid'; choose from clip_t, clip_i, dino"):
        evaluate(gen, metrics="clip_t,fid", **never)
    with pytest.raises(EvaluationError, match=r"images folder .*missing does not exist"):
        evaluate(tmp_path / "missing", metrics="clip_t", **never)
    with pytest.raises(EvaluationError, match=r"reference folder .*empty holds no images"):
        evaluate(gen, reference=tmp_path / "empty", metrics="dino", **never)
    with pytest.raises(EvaluationError, match=r"clip_i and dino need a reference folder"):
        evaluate(gen, metrics="clip_i,dino", **never)
    three = tmp_path / "three.txt"
    three.write_text("\n".join(PROMPTS))
    with pytest.raises(EvaluationError, match=r"three.txt has 3 prompts for 2 images"):
        evaluate(gen, prompts=three, metrics="clip_t", **never)
    (gen / "img_01.txt").unlink()
    with pytest.raises(EvaluationError, match=r"no prompt for 1 of 2 images .*img_01.png"):
        evaluate(gen, metrics="clip_t", **never)
    rows = tmp_path / "p.jsonl"
    rows.write_text(json.dumps({"file_name": "img_00.png", "prompt": "x"}) + "\n"
                    + json.dumps({"file_name": "gone.png", "prompt": "y"}) + "\n")
    with pytest.raises(EvaluationError,
                       match=r"no row for 1 \(first: img_01.png\); 1 rows name no image \(first: gone.png\)"):
        evaluate(gen, prompts=rows, metrics="clip_t", **never)


def test_models_load_from_safetensors_only(metric_models, tmp_path):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled-dino"
    shutil.copytree(metric_models["dino"], pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    gen = _folder(tmp_path / "gen", [1])
    with pytest.raises(EvaluationError, match=r"cannot load DINO model .*pickled-dino.*safetensors weights only"):
        evaluate(gen, reference=gen, metrics="dino", dino_model=str(pickled), device="cpu")


def test_cli_prints_a_table_and_json(metric_models, tmp_path, capsys):
    gen = _folder(tmp_path / "gen", [5, 6], prompts=PROMPTS[:2])
    ref = _folder(tmp_path / "ref", [5, 6])
    argv = ["evaluate", "--metrics", "clip_t,clip_i,dino", "--images", str(gen), "--reference", str(ref),
            "--clip-model", str(metric_models["clip"]), "--dino-model", str(metric_models["dino"]), "--device", "cpu"]
    assert main(argv + ["--per-image"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["metric", "mean", "detail"]
    assert [line.split()[0] for line in table[1:4]] == ["clip_t", "clip_i", "dino"]
    assert "2 x 2 image pairs" in table[2] and table[-1].endswith("img_01.png")
    assert main(argv + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["metrics"]) == {"clip_t", "clip_i", "dino"}
    assert table[3].split()[1] == f"{result['metrics']['dino']:.4f}"
    assert result["models"] == {"clip": str(metric_models["clip"]), "dino": str(metric_models["dino"])}


def test_cli_errors_exit_2_with_the_message(tmp_path, capsys):
    assert main(["evaluate", "--metrics", "clip_i", "--images", str(tmp_path / "nope"), "--reference", "x"]) == 2
    assert f"error: images folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--metrics", "clip_x", "--images", str(tmp_path)]) == 2
    assert "unknown metric 'clip_x'" in capsys.readouterr().err
    assert main(["evaluate", "--metrics", "dino"]) == 2
    assert "--metrics needs --images DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--metrics", "dino", "--benchmark", "toyworld"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--images", str(tmp_path)])
    assert "one of the arguments --metrics --benchmark is required" in capsys.readouterr().err


def test_cli_benchmark_hands_its_options_to_the_toyworld_module(monkeypatch):
    import sys
    import types

    seen = {}

    def run_from_args(args):
        seen["args"] = args
        return 3

    fake = types.ModuleType("dreamtune.toyworld.benchmark")
    fake.run_from_args = run_from_args
    monkeypatch.setitem(sys.modules, "dreamtune.toyworld", types.ModuleType("dreamtune.toyworld"))
    monkeypatch.setitem(sys.modules, "dreamtune.toyworld.benchmark", fake)
    assert main(["evaluate", "--benchmark", "toyworld", "--quick", "--samples", "4"]) == 3
    args = seen["args"]
    assert (args.benchmark, args.out, args.trainers, args.samples, args.seed, args.quick) == (
        "toyworld", "runs/toyworld-benchmark", "lora,dreambooth,dreambooth_prior,textual_inversion", 4, 0, True)
