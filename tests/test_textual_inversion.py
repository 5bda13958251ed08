"""Textual Inversion end to end on the tiny model: only the new rows learn, and the exports reproduce them."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import PartialState
from safetensors.torch import load_file

from dreamtune.data.captions import OBJECT_TEMPLATES, STYLE_TEMPLATES, ensure_token, pick_template
from dreamtune.config import ConfigError, load_config
from dreamtune.training.loop import Trainer
from dreamtune.models.loading import load_base_model
from dreamtune.registry import create_method
from dreamtune.training.step import StepContext
from dreamtune.weights.embeddings import load_embedding

from .conftest import render_32, tiny_run_config, saved_state

NAME = "sks_toy_ti"  # output.name in configs/tiny_ti.yaml


def ti_config(model_dir: Path, out: Path, *overrides: str):
    return tiny_run_config(
        "tiny_ti.yaml",
        model_dir,
        out,
        "train.max_steps=4",
        "train.learning_rate=5.0e-2",
        "train.save_every=2",
        "validation.every=0",
        "validation.num_inference_steps=2",
        "validation.images_per_prompt=1",
        "validation.prompts=[a photo of <sks>]",
        "textual_inversion.num_vectors=3",
        *overrides,
    )


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One short three-vector run (with a checkpoint at step 2), kept for every test of this module."""
    trainer = Trainer(ti_config(tiny_model_dir, tmp_path_factory.mktemp("ti-run")))
    return trainer, trainer.run()


def base_state(model_dir: Path, component: str) -> dict[str, torch.Tensor]:
    return saved_state(model_dir, component)


def step_context(batch: int) -> StepContext:
    """The first micro-batch of a one-process run: samples 0..batch-1 of step 0."""
    return StepContext(seed=0, global_step=0, micro_step=0, accumulated=0, positions=tuple(range(batch)),
                       num_instance=batch, generators=())


def embedding_table(trainer: Trainer) -> torch.Tensor:
    return trainer.models.text_encoder.get_input_embeddings().weight.detach().cpu()


# -- training ------------------------------------------------------------------------------------
def test_run_finishes_with_finite_loss_and_files(trained):
    trainer, result = trained
    assert result.global_step == 4 and np.isfinite(result.last_loss)
    assert [p.relative_to(result.output_dir).as_posix() for p in result.exported] == [
        f"final/{NAME}.safetensors", "diffusers/learned_embeds.safetensors"]
    assert result.ui_file == result.output_dir / "final" / f"{NAME}.safetensors"
    assert (result.output_dir / "samples" / "step-000004.png").is_file()
    card = (result.output_dir / "README.md").read_text()
    assert "Trigger: `<sks>`" in card and f"embedding:{NAME}" in card and "embeddings/" in card
    assert trainer.method.exporter_class(trainer.cfg, trainer.method).trigger() == "<sks>"


def test_only_the_new_rows_changed(trained, tiny_model_dir):
    trainer, _ = trained
    base = base_state(tiny_model_dir, "text_encoder")
    old_table = base["embeddings.token_embedding.weight"]
    table = embedding_table(trainer)
    vocab = old_table.shape[0]
    assert table.shape == (vocab + 3, old_table.shape[1])
    assert torch.equal(table[:vocab], old_table), "an old embedding row moved"
    assert trainer.method.token_ids == [vocab, vocab + 1, vocab + 2]
    initializer = old_table[trainer.models.tokenizer.convert_tokens_to_ids("toy</w>")]
    assert all(not torch.equal(row, initializer) for row in table[vocab:]), "a new row did not learn"


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_every_other_weight_bitwise_unchanged(trained, tiny_model_dir, component):
    trainer, _ = trained
    live = getattr(trainer.models, component).state_dict()
    original = base_state(tiny_model_dir, component)
    original.pop("embeddings.token_embedding.weight", None)  # compared row by row above
    changed = [k for k, v in original.items() if not torch.equal(live[k].cpu(), v)]
    assert changed == []


def test_multi_vector_word_expands_in_captions(trained):
    trainer, _ = trained
    method, tokenizer = trainer.method, trainer.models.tokenizer
    captions = method.captions(["ignored", "ignored"], step_context(2))
    assert all(c.count("<sks> <sks>_1 <sks>_2") == 1 for c in captions)
    assert all(c.replace("<sks> <sks>_1 <sks>_2", "{}") in OBJECT_TEMPLATES for c in captions)
    ids = tokenizer(captions[0]).input_ids
    assert [ids.count(i) for i in method.token_ids] == [1, 1, 1]
    assert method.expand("<sks> and <sks>_1, <sks>.") == "<sks> <sks>_1 <sks>_2 and <sks>_1, <sks> <sks>_1 <sks>_2."


def test_checkpoint_keeps_only_the_new_rows(trained):
    _, result = trained
    saved = load_file(str(result.checkpoints[0] / "trainable_text_encoder.safetensors"))
    assert saved["placeholder_rows"].shape == (3, 32)
    assert set(saved) == {"placeholder_rows"}


def test_resume_restores_the_rows(trained, tiny_model_dir, tmp_path, capsys):
    """4 steps straight == the step-2 checkpoint resumed for 2 more."""
    trainer, result = trained
    checkpoint = result.checkpoints[0]
    assert checkpoint.name == "step-000002"
    shutil.copytree(checkpoint, tmp_path / "checkpoints" / checkpoint.name)
    resumed = Trainer(ti_config(tiny_model_dir, tmp_path, "train.resume=auto", "validation.prompts=[]"))
    assert resumed.run().global_step == 4
    assert "resumed from" in capsys.readouterr().out
    ids = trainer.method.token_ids
    torch.testing.assert_close(embedding_table(resumed)[ids], embedding_table(trainer)[ids], atol=1e-6, rtol=0)
    assert torch.equal(embedding_table(resumed)[: ids[0]], embedding_table(trainer)[: ids[0]])


def test_bf16_keeps_the_embedding_fp32_and_the_only_trainable(tiny_model_dir, tmp_path):
    cfg = ti_config(tiny_model_dir, tmp_path, "train.mixed_precision=bf16", "train.max_steps=1",
                    "textual_inversion.num_vectors=1")
    trainer = Trainer(cfg)
    result = trainer.run()
    assert result.global_step == 1 and np.isfinite(result.last_loss) and result.samples  # validation ran
    m = trainer.models
    embedding = m.text_encoder.get_input_embeddings().weight
    assert embedding.dtype == torch.float32
    trainable = [p for module in (m.unet, m.vae, m.text_encoder) for p in module.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is embedding
    assert m.unet.dtype == torch.bfloat16 and m.vae.dtype == torch.bfloat16


# -- exports ---------------------------------------------------------------------------------------
def loaded_pipeline(model_dir: Path, noise_scheduler, embedding: Path | None = None, token: str | None = None):
    """A fresh base pipeline, with an exported embedding loaded by diffusers when given."""
    from diffusers import StableDiffusionPipeline

    from dreamtune.models.pipeline import inference_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.scheduler = inference_scheduler(noise_scheduler)
    pipe.set_progress_bar_config(disable=True)
    if embedding is not None:
        pipe.load_textual_inversion(str(embedding), token=token)
    return pipe


def in_memory_pipeline(trainer: Trainer):
    from dreamtune.models.pipeline import build_pipeline, inference_scheduler

    m = trainer.models
    for module in (m.unet, m.text_encoder):
        module.eval()
    return build_pipeline(m.tokenizer, m.text_encoder, m.vae, m.unet, inference_scheduler(m.noise_scheduler))


@pytest.fixture(scope="module")
def images(trained, tiny_model_dir):
    """The in-memory trained model's image, the base model's, and each export's as diffusers loads it."""
    trainer, result = trained
    prompt, final, scheduler = "a photo of <sks>", result.output_dir / "final", trainer.models.noise_scheduler
    out = {"trained": render_32(in_memory_pipeline(trainer), prompt)}
    out["base"] = render_32(loaded_pipeline(tiny_model_dir, scheduler), prompt)
    for export, path, token in [("diffusers", result.output_dir / "diffusers", None),
                                ("a1111", final / f"{NAME}.safetensors", "<sks>")]:
        pipe = loaded_pipeline(tiny_model_dir, scheduler, path, token)
        # diffusers names and expands the vectors as we do.
        assert pipe.maybe_convert_prompt(prompt, pipe.tokenizer) == trainer.method.expand(prompt)
        out[export] = render_32(pipe, prompt)
    return out


@pytest.mark.parametrize("export", ["diffusers", "a1111"])
def test_export_reproduces_trained_model(images, export):
    np.testing.assert_allclose(images[export], images["trained"], atol=1e-5)


def test_trained_model_differs_from_base(images):
    assert np.abs(images["trained"] - images["base"]).max() > 1e-2


def test_exported_files_hold_the_rows(trained):
    trainer, result = trained
    rows = embedding_table(trainer)[trainer.method.token_ids]
    diffusers_rows, token = load_embedding(result.output_dir / "diffusers" / "learned_embeds.safetensors")
    a1111_rows, a1111_token = load_embedding(result.output_dir / "final" / f"{NAME}.safetensors")
    assert token == "<sks>" and a1111_token is None
    assert torch.equal(diffusers_rows, rows) and torch.equal(a1111_rows, rows)
    assert not (result.output_dir / "variants" / f"{NAME}.pt").exists(), "the .pt is written only when asked"


def test_star_placeholder_and_legacy_pt(tiny_model_dir, tmp_path):
    """'S*' (which CLIP would split into s + *) is one id per vector; the .pt export loads in diffusers."""
    cfg = ti_config(tiny_model_dir, tmp_path, "textual_inversion.placeholder_token=S*",
                    "textual_inversion.num_vectors=2", "textual_inversion.export_pt=true",
                    "train.max_steps=2", "train.save_every=0", "validation.prompts=[a photo of S*]")
    trainer = Trainer(cfg)
    trainer.run()
    tokenizer, ids = trainer.models.tokenizer, trainer.method.token_ids
    caption = trainer.method.captions(["x"], step_context(1))[0]
    assert "S* S*_1" in caption
    assert [tokenizer(caption).input_ids.count(i) for i in ids] == [1, 1]
    assert tokenizer.tokenize("a photo of S* S*_1")[-2:] == ["S*", "S*_1"]
    pt = tmp_path / "variants" / f"{NAME}.pt"
    rows, name = load_embedding(pt, allow_pickle=True)
    assert name == NAME and torch.equal(rows, embedding_table(trainer)[ids])
    # Compared at the text encoder with the vectors spelled out: diffusers adds its tokens lowercased
    # ('s*'), so its own prompt expansion misses an upper-case multi-vector word (ours does not).
    loaded = loaded_pipeline(tiny_model_dir, trainer.models.noise_scheduler, pt, token="S*")
    trainer.models.text_encoder.eval()
    with torch.no_grad():
        ours, theirs = (
            encoder(tok("a photo of S* S*_1", return_tensors="pt").input_ids)[0]
            for encoder, tok in [(trainer.models.text_encoder, tokenizer), (loaded.text_encoder, loaded.tokenizer)]
        )
    assert tokenizer("a photo of S* S*_1").input_ids == loaded.tokenizer("a photo of S* S*_1").input_ids
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)


# -- captions ------------------------------------------------------------------------------------
def test_templates_are_deterministic_and_varied():
    picks = [pick_template("object", seed=1, epoch=2, index=i) for i in range(40)]
    assert picks == [pick_template("object", seed=1, epoch=2, index=i) for i in range(40)]
    assert len(set(picks)) > 10 and set(picks) <= set(OBJECT_TEMPLATES)
    assert pick_template("style", rng=random.Random(0)) in STYLE_TEMPLATES
    assert len(OBJECT_TEMPLATES) == 27 and len(STYLE_TEMPLATES) == 19
    assert ensure_token("a photo of toy", "<sks>") == "<sks> a photo of toy"
    assert ensure_token("a photo of <sks>", "<sks>") == "a photo of <sks>"


def test_data_captions_get_the_word_with_one_notice(tiny_model_dir, tmp_path):
    cfg = ti_config(tiny_model_dir, tmp_path, "textual_inversion.use_templates=false")
    method = create_method(cfg)
    with pytest.warns(UserWarning, match=r"6 of 6 captions do not contain '<sks>'; they get it put in front"):
        method.setup(load_base_model(cfg.model), PartialState())
    assert method.captions(["a photo of sks toy", "<sks> on a table"], step_context(2)) == [
        "<sks> <sks>_1 <sks>_2 a photo of sks toy",
        "<sks> <sks>_1 <sks>_2 on a table",
    ]


def test_ti_defaults(tiny_model_dir, tmp_path):
    cfg = load_config(None, ["trainer=textual_inversion"])
    assert cfg.train.learning_rate == 5.0e-4 and cfg.train.max_steps == 3000
    assert cfg.textual_inversion.placeholder_token == "<sks>" and cfg.data.instance_prompt == "a photo of a <sks>"
    assert load_config(None, ["trainer=textual_inversion", "train.learning_rate=1e-3"]).train.learning_rate == 1e-3


# -- errors before training ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["textual_inversion.placeholder_token=toy"], r"placeholder_token: toy \(read as 'toy</w>'\) already in"),
        (["textual_inversion.initializer_token=teddy bear"],
         r"initializer_token: 'teddy bear' is 6 tokens \['t', 'e', 'dd', 'y</w>', 'be', 'ar</w>'\], not one"),
        (["textual_inversion.initializer_token=''"], r"initializer_token: '' is 0 tokens \[\], not one"),
        (["output.name=learned_embeds"], r"output.name: 'learned_embeds' would name the A1111 file"),
    ],
)
def test_setup_errors_name_the_key(tiny_model_dir, tmp_path, overrides, message):
    cfg = ti_config(tiny_model_dir, tmp_path, *overrides)
    with pytest.raises(ValueError, match=message):
        create_method(cfg).setup(load_base_model(cfg.model), PartialState())


def test_placeholder_already_added_is_refused(tiny_model_dir, tmp_path):
    cfg = ti_config(tiny_model_dir, tmp_path, "textual_inversion.num_vectors=2")
    models = load_base_model(cfg.model)
    models.tokenizer.add_tokens(["<sks>_1"])
    with pytest.raises(ValueError, match=r"placeholder_token: <sks>_1 already in the tokenizer's vocabulary"):
        create_method(cfg).setup(models, PartialState())


@pytest.mark.parametrize("token", ["''", "'a b'"])
def test_empty_placeholder_fails_in_the_config(tiny_model_dir, tmp_path, token):
    with pytest.raises(ConfigError, match=r"'textual_inversion.placeholder_token': must be one new word"):
        ti_config(tiny_model_dir, tmp_path, f"textual_inversion.placeholder_token={token}")


# -- data ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("random_flip", [False, True])
def test_flip_follows_the_config(tiny_model_dir, tmp_path, monkeypatch, random_flip):
    """diffusers' TI script always flips; here data.random_flip decides, as for every trainer.

    An image dark on its left half is trained for 8 steps; every example the trainer draws is
    recorded. Unflipped, the left half stays dark; flipped (with random_flip=true), it is light.
    """
    from PIL import Image

    from dreamtune.data.dataset import ImageCaptionDataset

    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.full((32, 32, 3), 255, dtype=np.uint8)
    pixels[:, :16] = 0
    Image.fromarray(pixels).save(folder / "half.png")
    (folder / "half.txt").write_text("a photo of <sks>")
    seen: list[torch.Tensor] = []
    draw = ImageCaptionDataset.example

    def recording(self, index, target=None):
        example = draw(self, index, target)
        seen.append(example["pixel_values"])
        return example

    monkeypatch.setattr(ImageCaptionDataset, "example", recording)
    cfg = ti_config(tiny_model_dir, tmp_path / "out", f"data.instance_dir={folder}", f"data.random_flip={random_flip}",
                    "data.num_workers=0", "train.max_steps=8", "train.batch_size=1", "train.save_every=0",
                    "data.cache_latents=none")  # the examples carry pixels to look at
    Trainer(cfg).run()
    flipped = [bool(p[:, :, :16].mean() > p[:, :, 16:].mean()) for p in seen]
    assert len(seen) >= 8
    assert any(flipped) == random_flip, flipped
