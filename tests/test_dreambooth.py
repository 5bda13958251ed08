"""DreamBooth on the tiny model: what trains, the EMA, prior preservation, class images, exports, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreamtune.config import ConfigError, load_config
from dreamtune.training.loop import Trainer
from dreamtune.training.step import StepContext

from .conftest import REPO_ROOT, render_32, tiny_run_config, saved_state

PROMPT = "a photo of sks toy"


def db_config(model_dir: Path, out: Path, *overrides: str):
    return tiny_run_config(
        "tiny_dreambooth.yaml",
        model_dir,
        out,
        "train.max_steps=3",
        "train.learning_rate=1.0e-3",
        "train.save_every=0",
        "validation.every=0",
        "validation.num_inference_steps=2",
        "validation.images_per_prompt=1",
        f"validation.prompts=[{PROMPT}]",
        "logging.every=1",
        "export.dtype=fp32",
        "dreambooth.ema_decay=0.5",  # moves visibly within a few steps
        "dreambooth.ema_update_after_step=0",
        *overrides,
    )


def base_state(model_dir: Path, component: str) -> dict[str, torch.Tensor]:
    return saved_state(model_dir, component)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in b if not torch.equal(a[k].float(), b[k].float())]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """3 steps with prior preservation, the text encoder trained for 2 of them, EMA, both exports."""
    import accelerate

    cfg = db_config(
        tiny_model_dir, tmp_path_factory.mktemp("db-run"),
        "dreambooth.num_class_images=2", "dreambooth.class_generation_steps=2",
        "dreambooth.class_generation_batch_size=2", "dreambooth.text_encoder_steps=2",
        "train.gradient_checkpointing=true",
    )
    trainer = Trainer(cfg)
    logged, snapshots = [], {}
    after_step = trainer.method.after_step

    def spy_after_step(step: int) -> None:
        after_step(step)
        if step == 2:
            snapshots["text_encoder"] = state(trainer.models.text_encoder)
            snapshots["text_encoder_ema"] = [p.clone() for p in trainer.method.emas["text_encoder"].shadow_params]

    trainer.method.after_step = spy_after_step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(accelerate.Accelerator, "log", lambda self, values, step=None, **kw: logged.append(dict(values)))
        result = trainer.run()
    return trainer, result, logged, snapshots


def test_run_writes_the_exports_and_card(trained):
    _, result, _, _ = trained
    out = result.output_dir
    assert result.global_step == 3 and np.isfinite(result.last_loss)
    names = sorted(p.name for p in result.exported)
    assert names == ["diffusers", "sks_toy_db-raw.safetensors", "sks_toy_db.safetensors"]
    assert result.ui_file == out / "final" / "sks_toy_db.safetensors"
    assert (out / "diffusers" / "model_index.json").is_file()
    assert (out / "samples" / "step-000003.png").is_file()
    card = (out / "README.md").read_text()
    assert "models/Stable-diffusion/" in card and str(out / "diffusers") in card
    assert sorted(p.name for p in (out / "class_images").glob("*.png")) == ["class-00000.png", "class-00001.png"]


def test_unet_trains_vae_stays_bitwise(trained, tiny_model_dir):
    trainer, _, _, _ = trained
    unet = state(trainer.models.unet)
    moved = changed(unet, base_state(tiny_model_dir, "unet"))
    assert len(moved) > 0.9 * len(unet)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in trainer.models.unet.parameters())
    assert changed(state(trainer.models.vae), base_state(tiny_model_dir, "vae")) == []


def test_gradient_checkpointing_reaches_both_models(trained):
    trainer, _, _, _ = trained
    assert trainer.models.unet.is_gradient_checkpointing
    assert trainer.models.text_encoder.is_gradient_checkpointing


def test_text_encoder_trains_then_stops(trained, tiny_model_dir):
    trainer, _, _, snapshots = trained
    te = state(trainer.models.text_encoder)
    assert len(changed(te, base_state(tiny_model_dir, "text_encoder"))) > 0.9 * len(te)
    # dreambooth.text_encoder_steps=2: step 3 left it (and its EMA) exactly as after step 2.
    assert changed(te, snapshots["text_encoder"]) == []
    assert not any(p.requires_grad for p in trainer.models.text_encoder.parameters())
    ema_now = trainer.method.emas["text_encoder"].shadow_params
    assert all(torch.equal(a, b) for a, b in zip(ema_now, snapshots["text_encoder_ema"]))


def test_ema_differs_from_raw_and_base(trained, tiny_model_dir):
    trainer, _, _, _ = trained
    params = dict(trainer.models.unet.named_parameters())
    base = base_state(tiny_model_dir, "unet")
    ema = dict(zip(params, trainer.method.emas["unet"].shadow_params))
    assert sum(not torch.equal(ema[k], params[k].detach()) for k in params) > 0.9 * len(params)
    assert sum(not torch.equal(ema[k], base[k]) for k in params) > 0.9 * len(params)


def test_prior_loss_is_logged_each_step(trained):
    _, _, logged, _ = trained
    assert len(logged) == 3
    for scalars in logged:
        assert {"loss", "loss_instance", "loss_prior"} <= set(scalars)
        assert scalars["loss"] == pytest.approx(scalars["loss_instance"] + scalars["loss_prior"], rel=1e-5)


def batch_of(size: int, num_instance: int) -> StepContext:
    """Step 0 of a one-process run: ``num_instance`` instance samples, then their class samples."""
    return StepContext(seed=0, global_step=0, micro_step=0, accumulated=0, positions=tuple(range(size)),
                       num_instance=num_instance, generators=())


def test_loss_splits_instance_and_prior(tiny_model_dir, tmp_path):
    from dreamtune.trainers.dreambooth.method import DreamBoothMethod

    cfg = db_config(tiny_model_dir, tmp_path, "dreambooth.prior_loss_weight=0.5")
    method = DreamBoothMethod(cfg)
    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0])
    loss, scalars = method.loss(per_sample, batch_of(4, num_instance=2))
    assert loss.item() == pytest.approx(2.0 + 0.5 * 15.0)
    assert scalars == {"loss_instance": pytest.approx(2.0), "loss_prior": pytest.approx(15.0)}
    loss, scalars = method.loss(per_sample, batch_of(4, num_instance=4))
    assert loss.item() == pytest.approx(8.5) and scalars == {}


@pytest.fixture(scope="module")
def exported(trained, tiny_model_dir):
    """Images from the in-memory EMA model, the base, diffusers/ and the single file (diffusers' loader)."""
    from diffusers import StableDiffusionPipeline

    from dreamtune.models.pipeline import build_pipeline, inference_scheduler

    trainer, result, _, _ = trained
    m, final = trainer.models, result.output_dir / "final"
    scheduler = inference_scheduler(m.noise_scheduler)
    for module in (m.unet, m.text_encoder):
        module.eval()
    with trainer.method.weights("sample", trainer.unwrapped()):
        ema_pipe = build_pipeline(m.tokenizer, m.text_encoder, m.vae, m.unet, inference_scheduler(m.noise_scheduler))
        images = {"ema": render_32(ema_pipe, PROMPT)}
    pipes = {
        "base": StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None),
        "diffusers": StableDiffusionPipeline.from_pretrained(result.output_dir / "diffusers"),
        # diffusers' own single-file loader, configs from the tiny model folder (offline).
        "single_file": StableDiffusionPipeline.from_single_file(
            str(final / "sks_toy_db.safetensors"), config=str(tiny_model_dir), local_files_only=True,
            safety_checker=None,
        ),
    }
    for name, pipe in pipes.items():
        pipe.scheduler = scheduler
        pipe.set_progress_bar_config(disable=True)
        images[name] = render_32(pipe, PROMPT)
    return images, pipes


def test_diffusers_folder_reproduces_the_ema_model(exported):
    images, _ = exported
    np.testing.assert_allclose(images["diffusers"], images["ema"], atol=1e-5)
    assert np.abs(images["ema"] - images["base"]).max() > 1e-2


def test_single_file_loads_in_diffusers_and_matches_the_folder(exported):
    """Bitwise the same weights; the images agree to float rounding (the file's tensors sit at other
    memory alignments, so CPU kernels may sum in another order: ~1e-7 apart)."""
    images, pipes = exported
    for part in ("unet", "vae", "text_encoder"):
        loaded, folder = state(getattr(pipes["single_file"], part)), state(getattr(pipes["diffusers"], part))
        assert changed(loaded, folder) == [], part
    np.testing.assert_allclose(images["single_file"], images["diffusers"], atol=1e-5)


def test_raw_single_file_holds_the_trained_weights(trained):
    from dreamtune.weights.single_file import load_single_file_pipeline

    trainer, result, _, _ = trained
    raw = load_single_file_pipeline(result.output_dir / "variants" / "sks_toy_db-raw.safetensors",
                                    config_dir=trainer.cfg.model.pretrained)
    assert changed(state(raw.unet), state(trainer.models.unet)) == []
    assert changed(state(raw.text_encoder), state(trainer.models.text_encoder)) == []


def test_ema_resumes_from_the_checkpoint(tiny_model_dir, tmp_path):
    """Resuming the step-2 checkpoint of a 3-step run ends with that run's EMA and weights; the text
    encoder, stopped after step 2, stays stopped in the resumed run."""
    overrides = ("validation.prompts=[]", "dreambooth.prior_preservation=false", "dreambooth.text_encoder_steps=2",
                 "train.save_every=2")
    straight = Trainer(db_config(tiny_model_dir, tmp_path, *overrides))
    straight.run()
    assert (tmp_path / "checkpoints" / "step-000002").is_dir()
    resumed = Trainer(db_config(tiny_model_dir, tmp_path, *overrides, "train.resume=auto"))
    loaded = {}
    load_checkpoint = resumed.load_checkpoint

    def spy_load(folder):
        out = load_checkpoint(folder)
        loaded["step"] = resumed.method.emas["unet"].optimization_step
        return out

    resumed.load_checkpoint = spy_load
    assert resumed.run().global_step == 3
    assert loaded["step"] == 2
    ema_a, ema_b = straight.method.emas["unet"], resumed.method.emas["unet"]
    assert ema_b.optimization_step == 3
    assert all(torch.equal(a, b) for a, b in zip(ema_a.shadow_params, ema_b.shadow_params))
    for part in ("unet", "text_encoder"):
        assert changed(state(getattr(resumed.models, part)), state(getattr(straight.models, part))) == [], part
    assert resumed.method.text_encoder_frozen


def test_bf16_run_exports_the_base_vae_and_an_fp16_file(tiny_model_dir, tmp_path):
    """Frozen parts run in bf16 during training; the exports carry the base's own fp32 weights."""
    from safetensors import safe_open

    cfg = db_config(
        tiny_model_dir, tmp_path, "train.mixed_precision=bf16", "train.max_steps=1", "validation.prompts=[]",
        "dreambooth.prior_preservation=false", "dreambooth.train_text_encoder=false", "dreambooth.use_ema_for=ema", "dreambooth.ema_on_cpu=true", "export.dtype=fp16",
    )
    trainer = Trainer(cfg)
    trainer.run()
    assert trainer.models.vae.dtype == torch.bfloat16 and trainer.models.unet.dtype == torch.float32
    base_te = {k: v.to(torch.bfloat16) for k, v in base_state(tiny_model_dir, "text_encoder").items()}
    assert changed(state(trainer.models.text_encoder), base_te) == []  # not trained: only cast for the run
    folder = tmp_path / "diffusers"
    assert changed(base_state(folder, "vae"), base_state(tiny_model_dir, "vae")) == []
    assert changed(base_state(folder, "text_encoder"), base_state(tiny_model_dir, "text_encoder")) == []
    ema = trainer.method.emas["unet"]
    unet = base_state(folder, "unet")
    assert all(torch.equal(unet[n], s) for (n, _), s in zip(trainer.models.unet.named_parameters(), ema.shadow_params))
    with safe_open(str(tmp_path / "final" / "sks_toy_db.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        assert f.metadata()["dreamtune.weights"] == "ema"


def test_ema_every_n_steps_compounds_decay_and_round_trips():
    from dreamtune.trainers.dreambooth.ema import TrainingEMA

    weight = torch.nn.Parameter(torch.zeros(3))
    ema = TrainingEMA([weight], every=2, home=torch.device("cpu"), offload=True, decay=0.5, use_ema_warmup=False)
    with torch.no_grad():
        weight.fill_(1.0)
    ema.update(4, [weight])  # diffusers' ramp at step 4 is (1 + 3) / (10 + 3); two steps' worth of it
    decay = (4 / 13) ** 2
    assert torch.allclose(ema.shadow_params[0], torch.full((3,), 1 - decay))
    other = TrainingEMA([weight], every=1, home=torch.device("cpu"), offload=False, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.optimization_step == 4 and other.decay == 0.9  # the config's decay, the checkpoint's average
    assert torch.equal(other.shadow_params[0], ema.shadow_params[0])
    two = TrainingEMA([weight, weight], every=1, home=torch.device("cpu"), offload=False)
    with pytest.raises(ValueError, match="train.resume"):
        two.load_state_dict(ema.state_dict())


def test_class_images_generate_only_what_is_missing(tiny_model_dir, tmp_path):
    from accelerate import PartialState
    from PIL import Image

    from dreamtune.trainers.dreambooth.class_images import prepare_class_images
    from dreamtune.config import ModelConfig
    from dreamtune.models.loading import load_base_model
    from dreamtune.models.pipeline import build_pipeline, inference_scheduler

    m = load_base_model(ModelConfig(pretrained=str(tiny_model_dir)))
    pipe = build_pipeline(m.tokenizer, m.text_encoder, m.vae, m.unet, inference_scheduler(m.noise_scheduler))

    def prepare(folder: Path, count: int, batch_size: int):
        return prepare_class_images(PartialState(), lambda: pipe, folder, "a photo of toy", count, seed=7,
                                    batch_size=batch_size, steps=1, resolution=32)

    assert prepare(tmp_path / "resumed", 2, 2)[1] == 2  # an interrupted generation left 2 of 3
    records, made = prepare(tmp_path / "resumed", 3, 2)
    assert made == 1 and len(records) == 3 and {r.caption for r in records} == {"a photo of toy"}
    assert prepare(tmp_path / "resumed", 3, 2)[1] == 0
    assert prepare(tmp_path / "straight", 3, 3)[1] == 3
    for name in ("class-00000.png", "class-00001.png", "class-00002.png"):
        a, b = (np.asarray(Image.open(tmp_path / d / name), dtype=np.int16) for d in ("resumed", "straight"))
        assert np.abs(a - b).max() <= 1, name  # image i comes from seed + i, whatever the batching


def test_real_class_images_count_and_keep_their_captions(tmp_path):
    from accelerate import PartialState
    from PIL import Image

    from dreamtune.trainers.dreambooth.class_images import prepare_class_images

    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(tmp_path / f"real_{i}.jpg")
    (tmp_path / "real_0.txt").write_text("a photo of a brown toy")

    def no_pipeline():
        raise AssertionError("nothing is missing: no pipeline may be built")

    records, made = prepare_class_images(PartialState(), no_pipeline, tmp_path, "a photo of toy", 2, seed=0,
                                         batch_size=1, steps=1, resolution=32)
    assert made == 0 and [r.caption for r in records] == ["a photo of a brown toy", "a photo of toy"]


def test_config_defaults_and_errors(tmp_path):
    cfg = load_config(None, ["trainer=dreambooth", f"output.dir={tmp_path}"])
    assert cfg.dreambooth is not None and cfg.dreambooth.class_dir == str(tmp_path / "class_images")
    with pytest.raises(ConfigError, match=r"dreambooth.prior_preservation=true needs dreambooth.class_prompt"):
        load_config(None, ["trainer=dreambooth", "dreambooth.prior_preservation=true"])
    with pytest.raises(ConfigError, match=r"use_ema_for=both needs dreambooth.ema=true"):
        load_config(None, ["trainer=dreambooth", "dreambooth.use_ema_for=both"])


def test_blend_alpha_writes_base_blends(tiny_model_dir, tmp_path):
    """export.blend_alpha: alpha 0 is the base UNet, 1 the fine-tune, 0.5 their mean (single-file keys)."""
    from safetensors.torch import load_file

    from dreamtune.weights.single_file import single_file_to_diffusers

    cfg = db_config(tiny_model_dir, tmp_path, "train.max_steps=2", "validation.prompts=[]",
                    "dreambooth.prior_preservation=false", "dreambooth.train_text_encoder=false",
                    "dreambooth.ema=false", "dreambooth.use_ema_for=raw", "export.blend_alpha=[0, 0.5, 1]")
    result = Trainer(cfg).run()
    names = {p.name for p in result.exported}
    assert {"sks_toy_db-blend-0.00.safetensors", "sks_toy_db-blend-0.50.safetensors",
            "sks_toy_db-blend-1.00.safetensors"} <= names
    import json

    configs = {c: json.loads((tiny_model_dir / c / "config.json").read_text()) for c in ("unet", "vae")}
    unets = {}
    for alpha in ("0.00", "0.50", "1.00"):
        tensors = load_file(str(tmp_path / "variants" / f"sks_toy_db-blend-{alpha}.safetensors"))
        unets[alpha] = single_file_to_diffusers(tensors, configs["unet"], configs["vae"])[0]
    base = base_state(tiny_model_dir, "unet")
    tuned = base_state(tmp_path / "diffusers", "unet")
    assert changed(unets["0.00"], base) == [] and changed(unets["1.00"], tuned) == []
    key = "conv_in.weight"
    torch.testing.assert_close(unets["0.50"][key], (base[key] + tuned[key]) / 2, atol=1e-6, rtol=0)
    assert changed(tuned, base), "the fine-tune must differ from the base for this test to mean anything"


def test_blend_alpha_is_refused_for_lora(tmp_path):
    from dreamtune.config import ConfigError

    with pytest.raises(ConfigError, match="export.blend_alpha .* applies to trainer: dreambooth"):
        load_config(REPO_ROOT / "configs" / "tiny_lora.yaml", ["export.blend_alpha=0.7"])


def test_min_snr_weights_each_sample_before_the_prior_split(tiny_model_dir, tmp_path):
    """Instance and class samples get their own timestep's weight; then instance mean + weight x prior mean."""
    import dreamtune.training.objective as objective

    cfg = db_config(
        tiny_model_dir, tmp_path, "train.max_steps=1", "train.batch_size=2", "train.snr_gamma=5.0",
        "dreambooth.prior_loss_weight=0.5", "dreambooth.ema=false", "dreambooth.use_ema_for=raw",
        "dreambooth.num_class_images=2", "dreambooth.class_generation_steps=2",
        "dreambooth.class_generation_batch_size=2",
    )
    trainer = Trainer(cfg)
    seen: dict = {}
    method_loss, real_mse, real_weights = trainer.method.loss, objective.per_sample_error, objective.min_snr_weights

    def spy_mse(pred, target, *rest):
        mse = real_mse(pred, target, *rest)
        seen["mse"] = mse.detach().clone()
        return mse

    def spy_weights(scheduler, timesteps, gamma):
        seen["timesteps"] = timesteps.clone()
        return real_weights(scheduler, timesteps, gamma)

    def spy_loss(per_sample, ctx):
        seen["per_sample"], seen["num_instance"] = per_sample.detach().clone(), ctx.num_instance
        loss, scalars = method_loss(per_sample, ctx)
        seen["loss"] = loss.detach()
        return loss, scalars

    trainer.method.loss = spy_loss
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(objective, "per_sample_error", spy_mse)
        mp.setattr(objective, "min_snr_weights", spy_weights)
        trainer.run()
    assert seen["num_instance"] == 2 and seen["per_sample"].shape == (4,)
    alphas = trainer.models.noise_scheduler.alphas_cumprod.double()[seen["timesteps"].cpu()]
    snr = alphas / (1 - alphas)
    weights = (snr.clamp(max=5.0) / snr).float()
    torch.testing.assert_close(seen["per_sample"], seen["mse"] * weights)
    expected = seen["per_sample"][:2].mean() + 0.5 * seen["per_sample"][2:].mean()
    torch.testing.assert_close(seen["loss"], expected)
