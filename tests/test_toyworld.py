"""The toy world: renderer, captions, the committed base model and classifier, pretraining, benchmark."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from dreamtune.toyworld import world
from dreamtune.toyworld.benchmark import CONCEPT, write_concept_folder
from dreamtune.toyworld.paths import CLASSIFIER_DIR, MODEL_DIR, TOYWORLD_DIR

# ---- the world ------------------------------------------------------------------------------


def test_render_draws_the_colour_at_the_position_on_the_background():
    scene = world.Scene("square", "blue", "large", "top left", "black")
    pixels = np.asarray(world.render(scene))
    cx, cy = (int(f * world.RESOLUTION) for f in world.POSITIONS["top left"])
    assert tuple(pixels[cy, cx]) == world.COLORS["blue"]
    assert tuple(pixels[-2, -2]) == world.BACKGROUNDS["black"]


def test_every_shape_draws_a_different_mask():
    masks = {s: (np.asarray(world.render(world.Scene(s, "red"))) != world.BACKGROUNDS["white"]).any(-1)
             for s in world.ALL_SHAPES}
    shapes = list(masks)
    for i, a in enumerate(shapes):
        for b in shapes[i + 1:]:
            assert (masks[a] != masks[b]).sum() > 20, f"{a} and {b} look alike"


def test_random_scenes_never_show_held_out_combinations_or_new_shapes():
    rng = random.Random(0)
    scenes = [world.random_scene(rng) for _ in range(5000)]
    assert len(world.HELD_OUT) == 90 and not set(scenes) & world.HELD_OUT
    assert {s.shape for s in scenes} == set(world.BASE_SHAPES)
    assert len(set(scenes)) > 700  # every other combination does occur
    assert not any(shape in world.caption_corpus(0, 500) for shape in world.NEW_SHAPES)


def test_captions_name_shape_and_colour_in_several_phrasings():
    rng = random.Random(1)
    scene = world.Scene("circle", "red", "small", "top right", "gray")
    captions = {world.caption(scene, rng) for _ in range(200)}
    assert all("circle" in c and "red" in c for c in captions)
    assert any("in red" in c for c in captions) and any("red circle" in c for c in captions)
    assert any("top right" in c for c in captions) and any("top right" not in c for c in captions)
    assert all("top right" in world.caption(scene, rng, position_rate=1.0) for _ in range(50))
    assert world.full_caption(scene, "sks") == "a photo of a small red sks on a gray background, top right"
    assert world.full_caption(scene, "sks", color=False) == "a photo of a small sks on a gray background, top right"


def test_captions_leave_the_colour_out_at_the_colour_rate_and_only_then_draw_for_it():
    scene = world.Scene("circle", "red", "small", "top right", "gray")
    rng = random.Random(2)
    without = [world.caption(scene, rng, color_rate=0.8) for _ in range(1000)]
    share = sum("red" not in c for c in without) / len(without)
    assert 0.15 < share < 0.25, share
    assert all("circle" in c for c in without) and any(c.startswith("a photo of a circle") for c in without)
    # The default rate draws nothing extra: the tokenizer's caption corpus stays what it was.
    a, b = random.Random(3), random.Random(3)
    assert [world.caption(scene, a) for _ in range(50)] == [world.caption(scene, b, color_rate=1.0) for _ in range(50)]
    assert a.random() == b.random()


def test_shipped_concept_folder_is_what_the_benchmark_writes(tmp_path):
    written = write_concept_folder(tmp_path / "concept")
    shipped = TOYWORLD_DIR / "concept"
    assert sorted(p.name for p in written.iterdir()) == sorted(p.name for p in shipped.iterdir())
    for path in written.iterdir():
        assert path.read_bytes() == (shipped / path.name).read_bytes(), path.name
    assert all("{token}" in p.read_text() for p in shipped.glob("*.txt"))


# ---- the committed model and classifier -----------------------------------------------------


@pytest.fixture(scope="module")
def judge():
    from dreamtune.toyworld.classifier import load_classifier

    return load_classifier(CLASSIFIER_DIR)


def test_classifier_reads_fresh_renders(judge):
    from dreamtune.toyworld.classifier import accuracy

    scores = accuracy(judge, seed=7, count=300)
    assert min(scores.values()) >= 0.95, scores


def test_classifier_training_examples_include_unlabelled_heads_for_no_shape():
    """Empty images teach "none" and the background only; specks also their colour and place, never a size."""
    from dreamtune.toyworld.classifier import HEADS, NO_SHAPE, UNKNOWN, judge_examples

    images, labels = judge_examples(random.Random(0), 400)
    none = labels["shape"] == HEADS["shape"].index(NO_SHAPE)
    assert 20 < int(none.sum()) < 60 and len(images) == 400
    assert (labels["size"][none] == UNKNOWN).all() and (labels["size"][~none] != UNKNOWN).all()
    assert (labels["background"] != UNKNOWN).all()
    empty = none & (labels["color"] == UNKNOWN)
    assert 0 < int(empty.sum()) < int(none.sum())
    assert ((labels["position"] == UNKNOWN) == (labels["color"] == UNKNOWN)).all()
    for i in np.nonzero(empty.numpy())[0][:3]:  # one flat colour: the background
        assert len(set(images[i].getdata())) == 1


def test_speck_is_a_rendered_shape_a_few_pixels_across():
    from dreamtune.toyworld.classifier import SPECK_EXTENT

    scene = world.Scene(CONCEPT, "red", "large", "center", "white")
    sizes = {}
    for name, extent in (("speck", SPECK_EXTENT[1]), ("small", world.SIZES["small"]), ("scene", None)):
        mask = (np.asarray(world.render(scene, extent=extent)).astype(int) - world.BACKGROUNDS["white"]).any(-1)
        sizes[name] = int(mask.any(0).sum())
    assert sizes["speck"] <= 8 < 10 <= sizes["small"] < sizes["scene"], sizes


@pytest.mark.slow
def test_specks_the_base_draws_for_an_unknown_word_are_not_the_concept(judge):
    """"a photo of diamond" (no colour, "diamond" alone) gives specks of a few pixels. A judge that had
    to name a shape called all 16 stars (the concept then), so a TI word started from "diamond" scored
    as the concept; the current judge reads all 16 as no shape (measured; at least 14 asked)."""
    from dreamtune.toyworld.benchmark import GENERATION, load_base
    from dreamtune.toyworld.generate import generate

    shapes = [p["shape"] for p in judge.predict(generate(load_base(MODEL_DIR), ["a photo of diamond"] * 16, 3,
                                                         **GENERATION))]
    assert shapes.count(CONCEPT) == 0 and shapes.count("none") >= 14, shapes


def test_the_committed_vae_keeps_the_concept_legible(judge):
    """The benchmark's concept survives the base's VAE: what a trainer can at best make it draw.

    Round trips of the new shape in every colour, position and background, at both sizes, read as
    that shape and colour (measured: 90 of 90 large, 89 of 90 small). The star, the concept before
    the heart, came back as a pentagon blob: 78% of large stars read as stars."""
    from diffusers import AutoencoderKL

    from dreamtune.toyworld.classifier import predict_round_trips, vae_round_trip

    round_trip = vae_round_trip(AutoencoderKL.from_pretrained(str(MODEL_DIR / "vae")), "cpu")
    rng = random.Random(0)
    for size in world.SIZES:
        scenes = [world.Scene(CONCEPT, c, size, p, b) for c in world.COLORS for p in world.POSITIONS
                  for b in world.BACKGROUNDS]
        predictions = predict_round_trips(judge, round_trip, [world.render(s, jitter=rng) for s in scenes])
        right = sum(p["shape"] == CONCEPT and p["color"] == s.color for p, s in zip(predictions, scenes))
        assert right >= len(scenes) - 2, (size, right)


def test_classifier_refuses_other_labels(tmp_path):
    from dreamtune.toyworld.classifier import load_classifier

    for name in ("classifier.safetensors", "classifier.json"):
        (tmp_path / name).write_bytes((CLASSIFIER_DIR / name).read_bytes())
    (tmp_path / "classifier.json").write_text(json.dumps({"heads": {"shape": ["blob"]}}))
    with pytest.raises(ValueError, match="labels differ"):
        load_classifier(tmp_path)
    with pytest.raises(FileNotFoundError, match="pretrain_toyworld"):
        load_classifier(tmp_path / "missing")


def test_committed_model_is_small_sd1_safetensors():
    files = list(MODEL_DIR.rglob("*"))
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt")]
    weights = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    assert weights < 25e6, f"{weights / 1e6:.1f} MB of weights"
    index = json.loads((MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"


@pytest.mark.slow
def test_base_model_draws_held_out_shape_colour_pairs(judge):
    """Never-rendered caption combinations come out as the shape, colour and position asked for.

    The issue's bar is 90% (shape and colour); the committed model measures 93.9% over 360 samples
    and places 100% where asked (docs/benchmarks.md). 90 samples here, so the bar sits at 85%.
    """
    from dreamtune.toyworld.benchmark import GENERATION, load_base
    from dreamtune.toyworld.generate import classify_prompts
    from dreamtune.toyworld.pretrain import held_out_prompts

    quality = classify_prompts(load_base(MODEL_DIR), judge, held_out_prompts(), per_prompt=1, seed=500,
                               **GENERATION)
    assert quality["both"] >= 0.85 and quality["color"] >= 0.95 and quality["position"] >= 0.9, quality


@pytest.mark.slow
def test_base_model_places_a_shape_where_the_prompt_says(judge):
    """The short "<shape>, <position>" phrasing the benchmark's modifier prompt uses moves the shape."""
    from dreamtune.toyworld.benchmark import GENERATION, load_base
    from dreamtune.toyworld.generate import generate

    pipe = load_base(MODEL_DIR)
    for position in ("top left", "bottom right"):
        prompts = [f"a photo of a {c} {s}, {position}" for s, c in zip(world.BASE_SHAPES, world.COLORS)]
        placed = [p["position"] for p in judge.predict(generate(pipe, prompts, 0, **GENERATION))]
        assert placed.count(position) >= len(prompts) - 1, (position, placed)


# ---- pretraining and the benchmark ----------------------------------------------------------


@pytest.mark.slow
def test_pretraining_writes_a_loadable_model_and_classifier(tmp_path):
    from diffusers import StableDiffusionPipeline

    from dreamtune.toyworld.pretrain import pretrain, retrain_judge

    small = {"images": 64, "vae_steps": 3, "vae_batch": 4, "classifier_steps": 2, "unet_steps": 2,
             "unet_batch": 4, "quality_per_prompt": 1, "shape_only_per_shape": 1}
    report = pretrain(tmp_path / "tw", seed=3, overrides=small, log=lambda m: None)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tw" / "model", safety_checker=None,
                                                   use_safetensors=True)
    assert pipe.vae.config.scaling_factor == report["recipe"]["scaling_factor"] != 0.18215
    assert pipe.tokenizer.tokenize("a red sks") == ["a</w>", "red</w>", "s", "k", "s</w>"]
    assert set(report["timings"]) == {"render_s", "vae_s", "classifier_s", "denoiser_s"}
    assert (tmp_path / "tw" / "classifier" / "classifier.safetensors").is_file()
    assert 0.0 <= report["held_out_quality"]["both"] <= 1.0
    assert report["shape_only_accuracy"] in {i / len(world.BASE_SHAPES) for i in range(len(world.BASE_SHAPES) + 1)}
    assert set(report["classifier_on_vae_round_trips"]) == {"shape", "new_shape_recall", "new_shape_false", "no_shape"}

    # --classifier-only: the same seed on the same VAE gives the same judge; the rest of the report is kept.
    judge_file = tmp_path / "tw" / "classifier" / "classifier.safetensors"
    first = judge_file.read_bytes()
    judge_file.unlink()
    again = retrain_judge(tmp_path / "tw", log=lambda m: None)
    assert judge_file.read_bytes() == first
    assert again["timings"]["denoiser_s"] == report["timings"]["denoiser_s"]
    assert again["held_out_quality"] == report["held_out_quality"] and again["seed"] == 3


@pytest.mark.slow
def test_benchmark_quick_run_scores_exports(tmp_path, capsys):
    """Quick LoRA entry: trains, loads the exported file through diffusers, scores and writes tables."""
    from dreamtune.cli import main

    code = main(["evaluate", "--benchmark", "toyworld", "--out", str(tmp_path / "bench"),
                 "--trainers", "lora", "--quick", "--samples", "4"])
    assert code == 0
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    rows = results["rows"]
    assert set(rows) == {"base (untrained)", "lora"}
    assert rows["base (untrained)"]["concept_fidelity"] <= 0.5  # the base never drew a heart for "sks"
    assert rows["base (untrained)"]["base_accuracy"] >= 0.5
    assert rows["lora"]["export_bytes"] > 0 and rows["lora"]["train_seconds"] > 0
    assert (tmp_path / "bench" / "lora" / "samples.png").is_file()
    assert "| lora |" in capsys.readouterr().out


def test_benchmark_names_unknown_trainers(tmp_path):
    from dreamtune.toyworld.benchmark import run_benchmark

    with pytest.raises(ValueError, match="unknown lorra"):
        run_benchmark(tmp_path, ["lorra"], 4, 0, True)


@pytest.fixture
def trained_configs(tmp_path, monkeypatch) -> list:
    """The configs ``train`` is called with; training itself is replaced by a stub."""
    from dreamtune.training import loop

    seen = []

    def fake_train(cfg):
        seen.append(cfg)
        return type("Result", (), {"output_dir": str(tmp_path / "out")})()

    monkeypatch.setattr(loop, "train", fake_train)
    return seen


@pytest.mark.parametrize("quick", [False, True])
def test_benchmark_trains_dreambooth_with_its_shipped_recipe(tmp_path, trained_configs, quick):
    """The shipped config, paths and seed aside; --quick keeps its shape at a tenth of the steps."""
    from dreamtune.toyworld import benchmark

    benchmark.train_entry("dreambooth", tmp_path, tmp_path / "data", None, 7, quick, MODEL_DIR)
    [cfg] = trained_configs
    assert (cfg.train.seed, cfg.data.instance_dir, cfg.model.pretrained) == (7, str(tmp_path / "data"), str(MODEL_DIR))
    assert (cfg.train.max_steps, cfg.dreambooth.text_encoder_steps) == ((50, 25) if quick else (500, 250))
    assert cfg.dreambooth.train_text_encoder and cfg.validation.prompts == []


def test_benchmark_points_every_source_of_the_prior_recipe_at_its_folder(tmp_path, trained_configs):
    """The prior recipe trains each image twice (captioned, and as just the instance prompt): both sources move."""
    from dreamtune.data.sources import scan_records
    from dreamtune.toyworld import benchmark

    data = benchmark.write_concept_folder(tmp_path / "data")
    (tmp_path / "class").mkdir()
    (tmp_path / "class" / "class-00000.png").touch()  # only counted here: training is faked
    benchmark.train_entry("dreambooth_prior", tmp_path, data, tmp_path / "class", 7, False, MODEL_DIR)
    [cfg] = trained_configs
    sources = cfg.data.source_configs()
    assert [(s.instance_dir, s.ignore_captions) for s in sources] == [(str(data), False), (str(data), True)]
    captions = sorted(r.caption for r in scan_records(cfg.data)[0])
    assert len(captions) == 8 and captions[4:] == ["a photo of sks"] * 4
    assert all(c.startswith("a photo of a large sks on a ") for c in captions[:4])
    assert (cfg.train.batch_size, cfg.dreambooth.prior_loss_weight) == (8, 1.0)


def test_model_dir_constants_point_into_the_repo():
    assert TOYWORLD_DIR == Path(__file__).resolve().parents[1] / "dreamtune" / "toyworld" / "assets"


def test_benchmark_entries_are_the_packaged_recipes_and_configs_links_them():
    """One recipe file per entry inside the package; configs/ shows them under their user-facing names."""
    from dreamtune.toyworld import benchmark
    from dreamtune.toyworld.paths import RECIPE_DIR

    assert set(benchmark.ENTRIES) == set(benchmark.TARGETS) == {"lora", "dreambooth", "dreambooth_prior",
                                                                "textual_inversion", "lora_dora", "locon", "loha",
                                                                "lokr", "lora_prodigy", "pivotal"}
    assert all(path.parent == RECIPE_DIR for path in benchmark.ENTRIES.values())
    configs = Path(__file__).resolve().parents[1] / "configs"
    links = {"quickstart_lora.yaml": "lora", "toyworld_dreambooth.yaml": "dreambooth",
             "toyworld_dreambooth_prior.yaml": "dreambooth_prior", "toyworld_ti.yaml": "textual_inversion",
             "toyworld_pivotal.yaml": "pivotal"}
    for name, entry in links.items():
        assert (configs / name).resolve() == benchmark.ENTRIES[entry].resolve(), name
    assert [benchmark.uses_prior(path) for path in benchmark.ENTRIES.values()] == [
        entry == "dreambooth_prior" for entry in benchmark.ENTRIES]


def test_benchmark_reads_an_extra_recipe_as_a_new_entry(tmp_path, trained_configs):
    """A recipe dropped into the recipe folder is an entry; its word comes from the recipe."""
    import shutil

    from dreamtune.toyworld import benchmark

    shutil.copy(benchmark.ENTRIES["textual_inversion"], tmp_path / "ti_three_vectors.yaml")
    final, _, word = benchmark.train_entry("ti_three_vectors", tmp_path, tmp_path / "data", None, 7, True,
                                           MODEL_DIR, recipe_dir=tmp_path)
    [cfg] = trained_configs
    assert cfg.trainer == "textual_inversion" and word == "<sks>" and final == tmp_path / "out" / "final"
    with pytest.raises(ValueError, match="unknown lora; choose from ti_three_vectors"):
        benchmark.run_benchmark(tmp_path / "bench", ["lora"], 4, 0, True, recipe_dir=tmp_path)


# ---- the README quickstart --------------------------------------------------------------------


def _grid_cells(path: Path, rows: int, columns: int, label_h: int = 14):
    """The images of a validation grid (make_grid's layout: a label strip above each row)."""
    from PIL import Image

    grid = Image.open(path).convert("RGB")
    size = grid.width // columns
    return [[grid.crop((c * size, r * (size + label_h) + label_h, (c + 1) * size, (r + 1) * (size + label_h)))
             for c in range(columns)] for r in range(rows)]


@pytest.mark.slow
def test_quickstart_teaches_the_heart_and_shows_base_vs_trained(tmp_path, judge):
    """The README's first command, in-process: the LoRA makes "a photo of sks" draw hearts, the base did not."""
    from PIL import Image

    from dreamtune.config import load_config
    from dreamtune.training.loop import train

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "quickstart_lora.yaml", [
        f"model.pretrained={MODEL_DIR}", f"data.instance_dir={TOYWORLD_DIR / 'concept'}",
        f"output.dir={tmp_path / 'quickstart'}", "logging.report_to=[]", "train.save_every=0"])
    result = train(cfg)
    samples = result.output_dir / "samples"
    steps = cfg.train.max_steps
    side = Image.open(samples / "base-vs-trained.png").convert("RGB")
    base_grid = Image.open(samples / "step-000000.png").convert("RGB")
    final_grid = Image.open(samples / f"step-{steps:06d}.png").convert("RGB")
    assert side.size == (base_grid.width + 6 + final_grid.width, 14 + base_grid.height)
    assert np.array_equal(np.asarray(side.crop((0, 14, base_grid.width, side.height))), np.asarray(base_grid))

    columns = cfg.validation.images_per_prompt
    rows = len(cfg.validation.prompts)
    assert cfg.validation.prompts[0] == "a photo of sks"
    before = [p["shape"] for p in judge.predict(_grid_cells(samples / "step-000000.png", rows, columns)[0])]
    after = [p["shape"] for p in judge.predict(_grid_cells(samples / f"step-{steps:06d}.png", rows, columns)[0])]
    assert before.count(CONCEPT) <= 1 and after.count(CONCEPT) >= columns - 1, (before, after)
    assert sorted(p.name for p in result.exported) == ["pytorch_lora_weights.safetensors", "sks_heart_lora.safetensors"]
    card = (result.output_dir / "README.md").read_text()
    assert "- Trigger: `sks`" in card and "- Example prompt: `a photo of sks`" in card
    assert 'image = pipe("a photo of sks").images[0]' in card


def test_seed_summary_means_ranges_and_targets():
    from dreamtune.toyworld.benchmark import seeds_table, summarize_seeds

    def row(concept, prompt, base):
        return {"concept_fidelity": concept, "prompt_fidelity": prompt, "base_accuracy": base}

    per_seed = {0: {"lora": row(0.9, 1.0, 0.7)}, 1: {"lora": row(0.5, 0.8, 0.5)}}
    summary = summarize_seeds(per_seed)
    assert summary["lora"]["concept_fidelity"] == pytest.approx(0.7)
    assert summary["lora"]["range"]["concept_fidelity"] == (0.5, 0.9)
    assert summary["lora"]["targets"] == "missed: concept 0.70 < 0.80"  # judged on the mean, not the best seed
    assert "| lora | 70% (50%-90%) | 90% (80%-100%) | 60% (50%-70%) |" in seeds_table(summary, [0, 1])


def test_benchmark_refuses_bad_seed_lists(capsys):
    from dreamtune.cli import main

    assert main(["evaluate", "--benchmark", "toyworld", "--seeds", "0,x"]) != 0
    assert "--seeds must be distinct integers" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_over_seeds_writes_each_run_and_a_summary(tmp_path, capsys):
    from dreamtune.cli import main

    out = tmp_path / "bench"
    assert main(["evaluate", "--benchmark", "toyworld", "--out", str(out), "--trainers", "lora", "--quick",
                 "--samples", "2", "--seeds", "0,1"]) == 0
    per_seed = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in per_seed] == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    concepts = [r["rows"]["lora"]["concept_fidelity"] for r in per_seed]
    assert summary["rows"]["lora"]["concept_fidelity"] == pytest.approx(sum(concepts) / 2)
    assert "| lora |" in (out / "summary.md").read_text() and "2 seeds: 0, 1" in capsys.readouterr().out


def test_benchmark_tells_an_export_by_its_files(tmp_path):
    from dreamtune.toyworld.benchmark import export_kind, export_size

    for run, diffusers_file, final_bytes in (("db", "model_index.json", 10), ("lora", "pytorch_lora_weights.safetensors", 3),
                                             ("ti", "learned_embeds.safetensors", 2)):
        (tmp_path / run / "diffusers").mkdir(parents=True)
        (tmp_path / run / "diffusers" / diffusers_file).write_text("{}")
        (tmp_path / run / "final").mkdir()
        (tmp_path / run / "final" / f"{run}.safetensors").write_bytes(b"x" * final_bytes)
    finals = [tmp_path / n / "final" for n in ("db", "lora", "ti")]
    assert [export_kind(f.parent.name, f) for f in finals] == ["pipeline", "lora", "embedding"]
    assert [export_size(f.parent.name, f) for f in finals] == [10, 3, 2]
    (tmp_path / "empty" / "final").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="exported no diffusers model"):
        export_kind("empty", tmp_path / "empty" / "final")
    with pytest.raises(FileNotFoundError, match="wrote no final export"):
        export_kind("missing", tmp_path / "missing" / "final")


def test_benchmark_tells_a_pivotal_export_by_its_clip_l_file(tmp_path):
    """A LoRA beside the advanced script's clip_l embedding is pivotal, not a plain LoRA."""
    import torch
    from safetensors.torch import save_file

    from dreamtune.toyworld.benchmark import export_kind

    (tmp_path / "diffusers").mkdir()
    (tmp_path / "final").mkdir()
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "final" / "p.safetensors"))
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"))
    assert export_kind("pivotal", tmp_path / "final") == "lora"
    save_file({"clip_l": torch.zeros(2, 8)}, str(tmp_path / "diffusers" / "p_emb.safetensors"))
    assert export_kind("pivotal", tmp_path / "final") == "pivotal"


def test_benchmark_reads_a_lora_family_export_by_its_ui_file(tmp_path):
    """LoHa/LoKr/DoRA exports hold only the kohya/LyCORIS file: that is the export, loaded and sized."""
    import torch
    from safetensors.torch import save_file

    from dreamtune.toyworld.benchmark import export_kind, export_size, ui_lora_file

    final = tmp_path / "loha"
    final.mkdir()
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(final / "sks_heart_loha.safetensors"))
    save_file({"other": torch.zeros(1)}, str(final / "notes.safetensors"))
    assert ui_lora_file(final) == final / "sks_heart_loha.safetensors"
    assert export_kind("loha", final) == "lora"
    assert export_size("loha", final) == (final / "sks_heart_loha.safetensors").stat().st_size


# ---- from an installed wheel ------------------------------------------------------------------


def _copy_source(dest: Path) -> Path:
    """The checkout without git data or build leftovers (a stale build/lib would leak into the wheel)."""
    import shutil

    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "outputs", "runs",
                                  "wandb", ".pytest_cache")
    return Path(shutil.copytree(Path(__file__).resolve().parents[1], dest, ignore=skip, symlinks=True))


@pytest.mark.slow
def test_benchmark_runs_from_an_installed_wheel(tmp_path):
    """`pip install` of the built wheel, then `dreamtune evaluate --benchmark toyworld` from elsewhere.

    The new venv reaches this environment's packages through a .pth line (nothing is downloaded);
    the dreamtune it imports must be the installed one, with its model, judge and recipes inside.
    """
    import os
    import site
    import subprocess
    import sys
    import sysconfig
    import venv

    source = _copy_source(tmp_path / "src")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    [wheel] = (tmp_path / "dist").glob("dreamtune-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / ("Scripts" if os.name == "nt" else "bin") / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (Path(purelib) / "dreamtune_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    run = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                          "-q", "--disable-pip-version-check", str(wheel)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr

    work = tmp_path / "elsewhere"
    work.mkdir()
    # One torch thread, as conftest sets for this process: on a 2-core box the default two threads per
    # op contend, and the quick LoRA entry trains in ~5 s instead of ~2 min.
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    where = subprocess.run([str(python), "-c", "import dreamtune.toyworld.benchmark as b; "
                            "print(b.__file__); print(b.MODEL_DIR); print(sorted(b.ENTRIES))"],
                           cwd=work, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    module, model_dir, entries = where.stdout.splitlines()
    installed = Path(purelib).resolve() / "dreamtune"
    assert Path(module).resolve().is_relative_to(installed), module
    assert Path(model_dir).resolve().is_relative_to(installed) and (Path(model_dir) / "model_index.json").is_file()
    assert entries == str(["dreambooth", "dreambooth_prior", "locon", "loha", "lokr", "lora", "lora_dora",
                           "lora_prodigy", "pivotal", "textual_inversion"])

    dreamtune = python.with_name("dreamtune.exe" if os.name == "nt" else "dreamtune")
    run = subprocess.run([str(dreamtune), "evaluate", "--benchmark", "toyworld", "--quick", "--trainers", "lora",
                          "--samples", "2", "--out", str(work / "bench")], cwd=work, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    rows = json.loads((work / "bench" / "results.json").read_text())["rows"]
    assert set(rows) == {"base (untrained)", "lora"} and rows["lora"]["export_bytes"] > 0
    assert (work / "bench" / "lora" / "samples.png").is_file() and "| lora |" in run.stdout
