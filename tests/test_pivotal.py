"""Pivotal tuning on the tiny model: new words and a LoRA learned together, and exports that load as a user would."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import PartialState
from safetensors import safe_open
from safetensors.torch import load_file

from dreamtune.config import ConfigError
from dreamtune.models.loading import load_base_model
from dreamtune.registry import create_method
from dreamtune.training.loop import Trainer
from dreamtune.weights.describe import describe
from dreamtune.weights.embeddings import bundled_embeddings, load_embedding

from .conftest import render_32, saved_state, tiny_run_config

NAME = "sks_toy_pivotal"  # output.name in configs/tiny_pivotal.yaml
WORDS = ["<s0>", "<s1>"]
PROMPT = "a photo of <s0><s1> toy"


def pivotal_config(model_dir: Path, out: Path, *overrides: str):
    return tiny_run_config(
        "tiny_pivotal.yaml", model_dir, out,
        "train.max_steps=6",
        "train.learning_rate=5.0e-3",
        "train.lr_warmup_steps=0",
        "train.save_every=2",
        "train.checkpoints_total_limit=3",
        "validation.every=0",
        "validation.num_inference_steps=2",
        "validation.images_per_prompt=1",
        f"validation.prompts=[{PROMPT}]",
        "pivotal.learning_rate=5.0e-2",
        "pivotal.stop_fraction=0.5",  # the rows train for steps 1-3, the LoRA for all 6
        "lora.alpha=16",  # alpha != rank: the exports must keep the scale
        "lora.train_text_encoder=true",  # adapters and new rows in one text encoder
        *overrides,
    )


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One short run (checkpoints at steps 2, 4; the rows stop after step 3), kept for every test here."""
    trainer = Trainer(pivotal_config(tiny_model_dir, tmp_path_factory.mktemp("pivotal-run")))
    return trainer, trainer.run()


def table(trainer: Trainer) -> torch.Tensor:
    return trainer.models.text_encoder.get_input_embeddings().weight.detach().cpu()


def checkpoint(result, step: int) -> Path:
    return result.output_dir / "checkpoints" / f"step-{step:06d}"


# -- config ----------------------------------------------------------------------------------------
def test_config_reads_both_sections(tiny_model_dir, tmp_path):
    cfg = pivotal_config(tiny_model_dir, tmp_path, "lora.type=loha", "pivotal.tokens=[<a>, <b>]")
    assert cfg.trainer == "pivotal" and cfg.lora.type == "loha" and cfg.lora.rank == 8
    assert cfg.pivotal.words == ["<a>", "<b>"] and cfg.data.token == "<a><b>"
    assert "words <a><b>" in cfg.method_settings.card_settings() and "loha" in cfg.method_settings.card_settings()


def test_config_without_lora_section_gets_its_defaults(tiny_model_dir, tmp_path):
    from dreamtune.config import validate_config

    cfg = validate_config({"trainer": "pivotal", "model": {"pretrained": str(tiny_model_dir)}})
    assert cfg.lora is not None and cfg.lora.rank == 4 and cfg.data.token == "<s0><s1>"
    assert cfg.train.learning_rate == 1.0e-4 and cfg.pivotal.stop_fraction == 0.5


@pytest.mark.parametrize("overrides, message", [
    (["pivotal.tokens=[<a>]"], r"pivotal.tokens has 1 words but pivotal.num_vectors is 2"),
    (["pivotal.tokens=[<a>, <a>]"], r"pivotal.tokens: each word must be new, distinct"),
    (["data.token=sks"], r"data.token is 'sks', but trainer: pivotal fills \{token\}"),
    (["output.name=my.run"], r"output.name 'my.run' names the bundled embedding"),
    (["pivotal.stop_fraction=0"], r"'pivotal.stop_fraction'"),
    (["pivotal.norm_pull=2"], r"'pivotal.norm_pull'"),
    (["pivotal.lr=1"], r"unknown key 'pivotal.lr'"),
    (["pivotal.adapter_start=0.6"], r"pivotal.adapter_start \(0.6\) is after pivotal.stop_fraction \(0.5\)"),
    (["lora.rank_dropout=0.1"], r"lora.rank_dropout applies to lora.type loha or lokr"),
])
def test_config_errors_name_the_key(tiny_model_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        pivotal_config(tiny_model_dir, tmp_path, *overrides)


def test_known_word_is_refused(tiny_model_dir, tmp_path):
    cfg = pivotal_config(tiny_model_dir, tmp_path, "pivotal.tokens=[toy, <b>]")
    with pytest.raises(ConfigError, match=r"pivotal.tokens: toy \(read as 'toy</w>'\) already in the tokenizer"):
        create_method(cfg).setup(load_base_model(cfg.model), PartialState())


@pytest.mark.parametrize("pull", [1.0, 0.5])
def test_norm_pulled_toward_the_vocabulary(tiny_model_dir, tmp_path, pull):
    cfg = pivotal_config(tiny_model_dir, tmp_path, f"pivotal.norm_pull={pull}")
    method = create_method(cfg)
    method.setup(load_base_model(cfg.model), PartialState())
    weight = method.models.text_encoder.get_input_embeddings().weight
    vocabulary = weight.detach()[: method.rows.ids[0]].norm(dim=1).mean()
    with torch.no_grad():
        weight[method.rows.ids] = torch.randn(2, weight.shape[1]) * 10
    before = weight.detach()[method.rows.ids].norm(dim=1)
    method.after_step(1)
    after = weight.detach()[method.rows.ids].norm(dim=1)
    torch.testing.assert_close(after, before * (vocabulary / before) ** pull)
    assert (after - vocabulary).abs().max() < (before - vocabulary).abs().min()


# -- training --------------------------------------------------------------------------------------
def test_run_finishes_with_files_and_card(trained):
    trainer, result = trained
    out = result.output_dir
    assert result.global_step == 6 and np.isfinite(result.last_loss)
    assert [p.relative_to(out).as_posix() for p in result.exported] == [
        f"final/{NAME}.safetensors", f"variants/lora/{NAME}.safetensors", f"variants/embedding/{NAME}.safetensors",
        "diffusers/pytorch_lora_weights.safetensors", f"diffusers/{NAME}_emb.safetensors"]
    assert result.ui_file == out / "final" / f"{NAME}.safetensors"
    assert [p.name for p in (out / "final").iterdir()] == [f"{NAME}.safetensors"]
    assert (out / "samples" / "step-000006.png").is_file()
    card = (out / "README.md").read_text()
    assert "Trigger: `<s0><s1>`" in card and f"<lora:{NAME}:1>" in card and f"embedding:{NAME}" in card
    assert 'weight_name="pytorch_lora_weights.safetensors"' in card
    assert f"for ComfyUI and InvokeAI: `variants/lora/{NAME}.safetensors` and `variants/embedding/" in card
    assert "load_textual_inversion(state_dict[\"clip_l\"], token=['<s0>', '<s1>']" in card


def test_only_new_rows_and_adapters_train(trained, tiny_model_dir):
    trainer, _ = trained
    old = saved_state(tiny_model_dir, "text_encoder")["embeddings.token_embedding.weight"]
    live = table(trainer)
    vocab = old.shape[0]
    assert trainer.method.rows.ids == [vocab, vocab + 1] and live.shape == (vocab + 2, old.shape[1])
    assert torch.equal(live[:vocab], old), "an old embedding row moved"
    start = old[trainer.models.tokenizer.convert_tokens_to_ids("toy</w>")]
    assert all(not torch.equal(row, start) for row in live[vocab:]), "a new row did not learn"
    groups = {g["name"]: g["params"] for g in trainer.optimizer.param_groups}
    assert set(groups) == {"unet", "text_encoder", "embeddings"}
    assert all("lora_" in n for module in (trainer.models.unet, trainer.models.text_encoder)
               for n, p in module.named_parameters() if any(p is q for q in groups["unet"] + groups["text_encoder"]))


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_base_weights_bitwise_unchanged(trained, tiny_model_dir, component):
    trainer, _ = trained
    module = getattr(trainer.models, component)
    live = {k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if "lora_" not in k}
    original = saved_state(tiny_model_dir, component)
    original.pop("embeddings.token_embedding.weight", None)  # compared row by row above
    assert [k for k, v in original.items() if not torch.equal(live[k].cpu(), v)] == []


def test_rows_stop_after_the_fraction_while_the_lora_goes_on(trained):
    trainer, result = trained
    rows = {step: load_file(str(checkpoint(result, step) / "trainable_text_encoder.safetensors"))
            for step in (2, 4)}
    final = table(trainer)[trainer.method.rows.ids]
    assert not torch.equal(rows[2]["placeholder_rows"], rows[4]["placeholder_rows"]), "step 3 trained no row"
    assert torch.equal(rows[4]["placeholder_rows"], final), "the rows moved after the stop step"
    unet = {step: load_file(str(checkpoint(result, step) / "trainable_unet.safetensors")) for step in (4,)}
    live = dict(trainer.models.unet.named_parameters())
    assert any(not torch.equal(v, live[k].detach().cpu()) for k, v in unet[4].items()), "the LoRA stopped too"
    assert trainer.method.rows_frozen and not trainer.models.text_encoder.get_input_embeddings().weight.requires_grad


def test_resume_across_the_stop_is_exact(trained, tiny_model_dir, tmp_path, capsys):
    """6 steps straight == the step-2 checkpoint resumed for 4 more (the rows stop on the way)."""
    trainer, result = trained
    shutil.copytree(checkpoint(result, 2), tmp_path / "checkpoints" / "step-000002")
    resumed = Trainer(pivotal_config(tiny_model_dir, tmp_path, "train.resume=auto", "validation.prompts=[]"))
    assert resumed.run().global_step == 6 and "resumed from" in capsys.readouterr().out
    torch.testing.assert_close(table(resumed), table(trainer), atol=1e-6, rtol=0)
    for part in ("unet", "text_encoder"):
        mine = {n: p for n, p in getattr(resumed.models, part).named_parameters() if "lora_" in n}
        theirs = dict(getattr(trainer.models, part).named_parameters())
        assert mine
        for n, p in mine.items():
            torch.testing.assert_close(p.detach(), theirs[n].detach(), atol=1e-6, rtol=0)


# -- exports ---------------------------------------------------------------------------------------
def test_bundled_embedding_equals_the_separate_ones(trained):
    trainer, result = trained
    out, rows = result.output_dir, table(trainer)[trainer.method.rows.ids]
    with safe_open(str(out / "final" / f"{NAME}.safetensors"), "pt") as f:
        bundled = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert f"bundle_emb.{NAME}.string_to_param.*" in bundled and meta["modelspec.trigger_phrase"] == NAME
    separate, token = load_embedding(out / "variants" / "embedding" / f"{NAME}.safetensors")
    clip_l = load_file(str(out / "diffusers" / f"{NAME}_emb.safetensors"))
    assert token is None and set(clip_l) == {"clip_l"}
    assert torch.equal(bundled_embeddings(bundled)[NAME], separate)
    assert torch.equal(separate, clip_l["clip_l"]) and torch.equal(separate, rows)
    lora = load_file(str(out / "variants" / "lora" / f"{NAME}.safetensors"))
    assert {k: v for k, v in bundled.items() if not k.startswith("bundle_emb.")}.keys() == lora.keys()
    assert all(torch.equal(bundled[k], v) for k, v in lora.items())


def test_inspect_says_who_loads_the_bundle(trained):
    _, result = trained
    info = describe(result.output_dir / "final" / f"{NAME}.safetensors")
    assert info["kind"] == "lora" and info["layout"] == "kohya" and info["bundled_embeddings"] == {NAME: 2}
    assert info["loads_in"]["AUTOMATIC1111/Forge"].startswith("yes") and info["modules"]["text_encoder"] > 0
    assert info["loads_in"]["diffusers"].startswith("no")
    clip_l = describe(result.output_dir / "diffusers" / f"{NAME}_emb.safetensors")
    assert (clip_l["kind"], clip_l["layout"]) == ("textual-inversion", "clip_l")


def fresh_pipeline(model_dir: Path, noise_scheduler):
    from diffusers import StableDiffusionPipeline

    from dreamtune.models.pipeline import inference_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.scheduler = inference_scheduler(noise_scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def images(trained, tiny_model_dir):
    """The in-memory model's image, and the exports' as a user loads them (the card's lines)."""
    from dreamtune.models.pipeline import build_pipeline, inference_scheduler

    trainer, result = trained
    m, out = trainer.models, result.output_dir
    for module in (m.unet, m.text_encoder):
        module.eval()
    images = {"trained": render_32(build_pipeline(m.tokenizer, m.text_encoder, m.vae, m.unet,
                                                  inference_scheduler(m.noise_scheduler)), PROMPT)}
    images["base"] = render_32(fresh_pipeline(tiny_model_dir, m.noise_scheduler), PROMPT)
    for name, lora, embedding in [
        ("diffusers", (out / "diffusers", "pytorch_lora_weights.safetensors"),
         out / "diffusers" / f"{NAME}_emb.safetensors"),
        ("kohya+a1111", (out / "variants" / "lora", f"{NAME}.safetensors"),
         out / "variants" / "embedding" / f"{NAME}.safetensors"),
    ]:
        pipe = fresh_pipeline(tiny_model_dir, m.noise_scheduler)
        pipe.load_lora_weights(str(lora[0]), weight_name=lora[1])
        vectors = load_file(str(embedding))
        pipe.load_textual_inversion(next(iter(vectors.values())), token=WORDS, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        assert pipe.tokenizer(PROMPT).input_ids == m.tokenizer(PROMPT).input_ids
        images[name] = render_32(pipe, PROMPT)
    return images


def test_benchmark_loads_the_export_as_the_card_says(trained, tiny_model_dir, images):
    from dreamtune.toyworld.benchmark import export_kind, load_export

    trainer, result = trained
    final = result.output_dir / "final"
    assert export_kind("pivotal", final) == "pivotal"
    pipe = load_export("pivotal", tiny_model_dir, final)
    pipe.scheduler = fresh_pipeline(tiny_model_dir, trainer.models.noise_scheduler).scheduler
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(render_32(pipe, PROMPT), images["trained"], atol=2e-3)


def test_sample_applies_the_bundled_file_and_the_clip_l_file(trained, tiny_model_dir, images):
    """`dreamtune sample --lora final/<name>.safetensors`: the LoRA and the bundled word (A1111's reading);
    `--embedding diffusers/<name>_emb.safetensors` takes its words from the file's trigger."""
    from dreamtune.commands.sample import load_extras

    trainer, result = trained
    out = result.output_dir
    pipe = fresh_pipeline(tiny_model_dir, trainer.models.noise_scheduler)
    assert load_extras(pipe, [str(out / "final" / f"{NAME}.safetensors")], [], 1.0) == [
        f"embedding {NAME}", f"{NAME} x1"]
    np.testing.assert_allclose(render_32(pipe, PROMPT.replace("<s0><s1>", NAME)), images["trained"], atol=2e-3)
    pipe = fresh_pipeline(tiny_model_dir, trainer.models.noise_scheduler)
    load_extras(pipe, [str(out / "diffusers")], [str(out / "diffusers" / f"{NAME}_emb.safetensors")], 1.0)
    np.testing.assert_allclose(render_32(pipe, PROMPT), images["trained"], atol=2e-3)


@pytest.mark.parametrize("export", ["diffusers", "kohya+a1111"])
def test_exports_reproduce_the_trained_model(images, export):
    np.testing.assert_allclose(images[export], images["trained"], atol=2e-3)


def test_trained_model_differs_from_base(images):
    assert np.abs(images["trained"] - images["base"]).max() > 1e-2


def test_diffusers_refuses_the_bundled_file(trained, tiny_model_dir):
    trainer, result = trained
    pipe = fresh_pipeline(tiny_model_dir, trainer.models.noise_scheduler)
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        pipe.load_lora_weights(str(result.output_dir / "final"), weight_name=f"{NAME}.safetensors")


def test_loha_adapter_exports_and_loads_through_merge_lora(tiny_model_dir, tmp_path):
    """lora.type loha: no diffusers LoRA file; the benchmark bakes variants/lora/ in and adds the words."""
    from dreamtune.models.pipeline import build_pipeline, inference_scheduler
    from dreamtune.toyworld.benchmark import load_export

    trainer = Trainer(pivotal_config(tiny_model_dir, tmp_path, "lora.type=loha", "lora.train_text_encoder=false",
                                     "train.max_steps=2", "train.save_every=0", "validation.prompts=[]",
                                     "export.dtype=fp32"))
    result = trainer.run()
    out = result.output_dir
    assert [p.relative_to(out).as_posix() for p in result.exported] == [
        f"final/{NAME}.safetensors", f"variants/lora/{NAME}.safetensors", f"variants/embedding/{NAME}.safetensors",
        f"diffusers/{NAME}_emb.safetensors"]
    assert "merge-lora" in (out / "README.md").read_text()
    m = trainer.models
    for module in (m.unet, m.text_encoder):
        module.eval()
    expected = render_32(build_pipeline(m.tokenizer, m.text_encoder, m.vae, m.unet,
                                        inference_scheduler(m.noise_scheduler)), PROMPT)
    pipe = load_export("pivotal", tiny_model_dir, out / "final")
    pipe.scheduler = inference_scheduler(m.noise_scheduler)
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(render_32(pipe, PROMPT), expected, atol=2e-3)


def test_adapter_waits_for_its_start_while_the_words_learn(tiny_model_dir, tmp_path):
    """pivotal.adapter_start=0.5 of 4 steps: lora_B (zero at the start) stays zero through step 2, then learns."""
    trainer = Trainer(pivotal_config(tiny_model_dir, tmp_path, "train.max_steps=4", "pivotal.stop_fraction=1.0",
                                     "pivotal.adapter_start=0.5", "validation.prompts=[]"))
    result = trainer.run()
    at_2 = load_file(str(checkpoint(result, 2) / "trainable_unet.safetensors"))
    ups = [k for k in at_2 if "lora_B" in k]
    assert ups and all(not at_2[k].any() for k in ups), "the adapter learned before its start"
    live = dict(trainer.models.unet.named_parameters())
    assert all(live[k].detach().abs().sum() > 0 for k in ups), "the adapter did not learn after its start"
    rows_2 = load_file(str(checkpoint(result, 2) / "trainable_text_encoder.safetensors"))["placeholder_rows"]
    start = saved_state(tiny_model_dir, "text_encoder")["embeddings.token_embedding.weight"][
        trainer.models.tokenizer.convert_tokens_to_ids("toy</w>")]
    assert all(not torch.equal(row, start) for row in rows_2), "the words did not learn alone"
