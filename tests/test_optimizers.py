"""train.optimizer beyond AdamW: each resumes bit-identically, schedule-free samples and exports its eval
weights, and what cannot work is refused naming the key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreamtune.config import load_config
from dreamtune.errors import ConfigError
from dreamtune.training import optim
from dreamtune.training.loop import Trainer

from .test_runtime import config, interrupt_at

RESUMED = {
    "prodigy": ["train.learning_rate=1.0", "train.lr_scheduler=constant"],
    "lion": ["train.learning_rate=1.0e-3"],
    "lion8bit": ["train.learning_rate=1.0e-3"],
    "adafactor": ["train.lr_scheduler=constant", "train.lr_warmup_steps=0",
                  "train.optimizer_args={relative_step: true, scale_parameter: true, warmup_init: true}"],
    "adamw_schedulefree": ["train.lr_scheduler=constant_with_warmup", "train.lr_warmup_steps=2"],
    "torch.optim.RAdam": ["train.optimizer_args={decoupled_weight_decay: true, betas: [0.8, 0.99]}"],
}


def optimizer_config(model_dir: Path, out: Path, name: str, *overrides: str):
    return config(model_dir, out, f"train.optimizer={name}", *RESUMED[name], "train.max_steps=4",
                  "train.save_every=0", *overrides)


def lora_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "diffusers" / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("name", list(RESUMED))
def test_resume_matches_a_straight_run(tiny_model_dir, tmp_path, monkeypatch, name):
    """4 steps straight == stop at 2, resume to 4, bitwise: the optimizer's state (Prodigy's d, schedule-free's z
    and averages, Adafactor's factored moments and step) goes through the checkpoint whole."""
    straight = Trainer(optimizer_config(tiny_model_dir, tmp_path / "straight", name))
    straight.run()
    inner = straight.optimizer.optimizer
    assert type(inner).__name__ == {"prodigy": "Prodigy", "lion": "Lion", "lion8bit": "Lion8bit", "adafactor": "Adafactor",
                                    "adamw_schedulefree": "AdamWScheduleFree", "torch.optim.RAdam": "RAdam"}[name]
    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2)
        assert Trainer(optimizer_config(tiny_model_dir, out, name, "train.resume=auto")).run().global_step == 2
    resumed = Trainer(optimizer_config(tiny_model_dir, out, name, "train.resume=auto"))
    assert resumed.run().global_step == 4
    expected, got = lora_weights(tmp_path / "straight"), lora_weights(out)
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []
    base = lora_weights(tmp_path / "straight")
    assert any(v.abs().sum() > 0 for k, v in base.items() if "lora_B" in k or "lora_up" in k), "nothing trained"
    if name == "adafactor":
        assert inner.param_groups[0]["relative_step"] and inner.param_groups[0]["warmup_init"]
        assert type(straight.lr_scheduler.scheduler).__name__ == "AdafactorSchedule"
    if name == "torch.optim.RAdam":
        assert inner.param_groups[0]["betas"] == (0.8, 0.99) and inner.param_groups[0]["decoupled_weight_decay"]


def test_schedule_free_samples_and_exports_its_eval_weights(tiny_model_dir, tmp_path, monkeypatch):
    """The export holds x (the average), not the y the gradients were taken at; training resumes at y exactly."""
    from dreamtune.models import render

    cfg = optimizer_config(tiny_model_dir, tmp_path, "adamw_schedulefree", "validation.prompts=[a photo of sks toy]",
                           "validation.num_inference_steps=1", "validation.images_per_prompt=1")
    trainer = Trainer(cfg)
    seen = {}
    original_render = render.render_images

    def spy_render(pipe, *args, **kwargs):
        seen["sampled"] = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "lora" in n}
        return original_render(pipe, *args, **kwargs)

    monkeypatch.setattr("dreamtune.training.loop.render_images", spy_render)
    trainer.run()
    inner = trainer.optimizer.optimizer
    assert all(g["train_mode"] for g in inner.param_groups)
    unet = trainer.unwrapped()["unet"]
    train_y = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    beta1 = inner.param_groups[0]["betas"][0]
    eval_x = {n: (p.detach().lerp(inner.state[p]["z"], 1 - 1 / beta1))
              for n, p in unet.named_parameters() if p.requires_grad}
    assert any(not torch.equal(train_y[n], eval_x[n]) for n in train_y), "x == y: the test cannot tell them apart"
    assert seen["sampled"].keys() == eval_x.keys()
    assert all(torch.equal(seen["sampled"][n], eval_x[n]) for n in eval_x)

    from peft import get_peft_model_state_dict

    with optim.optimizer_eval_mode(trainer.optimizer):
        expected = {k: v.clone() for k, v in get_peft_model_state_dict(unet).items()}
    exported = lora_weights(tmp_path)
    keys = {k.removeprefix("unet."): k for k in exported}
    assert all(torch.equal(exported[keys[k]], v.to(exported[keys[k]].dtype)) for k, v in expected.items())
    assert all(torch.equal(p, train_y[n]) for n, p in unet.named_parameters() if p.requires_grad), \
        "leaving eval mode must restore the training weights bit for bit"


def test_eval_mode_leaves_other_optimizers_alone():
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param])
    with optim.optimizer_eval_mode(opt):
        assert torch.equal(param, torch.ones(3))


@pytest.mark.parametrize("overrides, message", [
    (["train.optimizer=adamw_schedulefree", "train.lr_scheduler=cosine"],
     r"adamw_schedulefree warms up inside the optimizer .* must be constant or constant_with_warmup \(got cosine\)"),
    (["train.optimizer=adafactor", "train.lr_scheduler=linear"],
     r"relative_step=true .*relative_step=false to use train\.learning_rate.* must be constant \(got linear\)"),
    (["train.optimizer=sgd"], r"train\.optimizer.*choose one of adamw, adamw8bit, prodigy.*import path"),
    (["train.full_bf16=true"], r"train\.full_bf16=true .* needs train\.mixed_precision=bf16 \(got no\)"),
])
def test_impossible_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["trainer=lora", *overrides])


def test_adafactor_without_relative_step_takes_any_schedule():
    cfg = load_config(None, ["trainer=lora", "train.optimizer=adafactor", "train.lr_scheduler=cosine",
                             "train.optimizer_args={relative_step: false}"])
    param = torch.nn.Parameter(torch.ones(3))
    opt = optim.build_optimizer(cfg.train, [{"params": [param], "lr": 1e-3}])
    assert opt.param_groups[0]["lr"] == 1e-3 and not opt.param_groups[0]["relative_step"]


def opt_cfg(*overrides: str):
    return load_config(None, ["trainer=lora", *overrides]).train


def groups():
    return [{"name": "unet", "params": [torch.nn.Parameter(torch.ones(3))], "lr": 1.0}]


def test_missing_package_is_refused_with_the_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(ConfigError, match=r"train\.optimizer=prodigy needs the prodigyopt package.*"
                                          r"pip install 'dreamtune\[optimizers\]' \(or pip install prodigyopt\)"):
        optim.build_optimizer(opt_cfg("train.optimizer=prodigy"), groups())


@pytest.mark.parametrize("path, message", [
    ("no_such_pkg.Opt", r"module 'no_such_pkg' cannot be imported"),
    ("torch.optim.NoSuch", r"module 'torch.optim' has no 'NoSuch'"),
    ("torch.nn.Linear", r"torch\.nn\.Linear is not a torch\.optim\.Optimizer subclass"),
])
def test_bad_import_path_is_named(path, message):
    with pytest.raises(ConfigError, match=message):
        optim.build_optimizer(opt_cfg(f"train.optimizer={path}"), groups())


def test_unknown_optimizer_args_are_named():
    with pytest.raises(ConfigError, match=r"train\.optimizer_args: Lion does not accept"):
        optim.build_optimizer(opt_cfg("train.optimizer=lion", "train.optimizer_args={momentum: 0.9}"), groups())


def test_optimizer_args_override_the_adam_defaults():
    opt = optim.build_optimizer(opt_cfg("train.optimizer=prodigy", "train.adam_weight_decay=0.5",
                                        "train.optimizer_args={d_coef: 2.0, betas: [0.8, 0.9]}"), groups())
    group = opt.param_groups[0]
    assert group["d_coef"] == 2.0 and group["betas"] == (0.8, 0.9) and group["weight_decay"] == 0.5
    assert group["use_bias_correction"] and group["safeguard_warmup"]  # Prodigy's advice for diffusion, by default
    plain = optim.build_optimizer(opt_cfg("train.optimizer=prodigy", "train.optimizer_args={use_bias_correction: "
                                          "false, safeguard_warmup: false}"), groups())
    assert not plain.param_groups[0]["use_bias_correction"] and not plain.param_groups[0]["safeguard_warmup"]
    lion = optim.build_optimizer(opt_cfg("train.optimizer=lion", "train.adam_weight_decay=0.3"), groups())
    assert lion.param_groups[0]["betas"] == (0.9, 0.99) and lion.param_groups[0]["weight_decay"] == 0.3


def test_prodigy_warns_about_a_small_learning_rate():
    with pytest.warns(UserWarning, match=r"prodigy with a learning rate of 0\.0001.*train\.learning_rate=1\.0"):
        optim.build_optimizer(opt_cfg("train.optimizer=prodigy"), [{**groups()[0], "lr": 1e-4}])


def test_prodigy_logs_the_rate_it_trains_at():
    from dreamtune.training.progress import run_scalars

    opt = optim.build_optimizer(opt_cfg("train.optimizer=prodigy", "train.learning_rate=1.0"), groups())
    opt.param_groups[0]["d"] = 2.5e-4
    scalars = run_scalars(opt_cfg(), opt, 1, 1.0)
    assert scalars["lr/unet"] == 1.0 and scalars["d*lr/unet"] == 2.5e-4
