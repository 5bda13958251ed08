"""The speed switches (train.allow_tf32, attention, channels_last, adamw_impl, compile) change how, not what.

Each switch is checked to be in effect on the trained run, and to give the default run's losses and
weights on the tiny model within floating-point tolerance.
"""

from __future__ import annotations

import pytest
import torch

from dreamtune.errors import ConfigError
from dreamtune.training.loop import Trainer
from dreamtune.training.speed import KernelAttnProcessor, set_tf32

from .conftest import tiny_run_config

STEPS = ("train.max_steps=3", "train.save_every=0", "validation.prompts=[]", "lora.rank=4")


def run_recording(cfg) -> tuple[list[float], dict[str, torch.Tensor], Trainer]:
    """Train ``cfg``; return each micro-step's loss, the trained tensors and the trainer."""
    trainer, losses = Trainer(cfg), []
    step = trainer._train_step

    def recording(batch, micro_step):
        loss, scalars = step(batch, micro_step)
        losses.append(float(loss.detach()))
        return loss, scalars

    trainer._train_step = recording
    trainer.run()
    weights = {f"{name}.{k}": v.detach().clone() for name, module in trainer.unwrapped().items()
               for k, v in module.named_parameters() if v.requires_grad}
    return losses, weights, trainer


@pytest.fixture(scope="module")
def default_run(tiny_model_dir, tmp_path_factory):
    return run_recording(tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path_factory.mktemp("default"), *STEPS))


def assert_same_training(run, reference, rtol=1e-4, atol=1e-5):
    losses, weights, _ = run
    ref_losses, ref_weights, _ = reference
    assert len(losses) == len(ref_losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=rtol, atol=atol)
    assert weights.keys() == ref_weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(value, ref_weights[key], rtol=rtol, atol=atol, msg=key)


def test_allow_tf32_sets_both_torch_flags():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        set_tf32(False)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        set_tf32(True)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_the_default_run_sets_tf32_fuses_adamw_and_keeps_diffusers_attention(default_run):
    _, _, trainer = default_run
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert trainer.optimizer.optimizer.defaults["fused"] is True
    processors = trainer.models.unet.attn_processors.values()
    assert processors and not any(isinstance(p, KernelAttnProcessor) for p in processors)


@pytest.mark.parametrize("attention", ["math", "flash"])
def test_attention_kernel_is_used_and_trains_alike(attention, default_run, tiny_model_dir, tmp_path):
    run = run_recording(tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, *STEPS,
                                        f"train.attention={attention}"))
    processors = list(run[2].models.unet.attn_processors.values())
    assert processors and all(isinstance(p, KernelAttnProcessor) for p in processors)
    assert_same_training(run, default_run)


def test_channels_last_is_used_and_trains_alike(default_run, tiny_model_dir, tmp_path):
    run = run_recording(tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, *STEPS, "train.channels_last=true"))
    conv = run[2].models.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert_same_training(run, default_run)


@pytest.mark.parametrize("impl, flag", [("foreach", "foreach"), ("for_loop", "foreach")])
def test_adamw_impl_is_used_and_trains_alike(impl, flag, default_run, tiny_model_dir, tmp_path):
    run = run_recording(tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, *STEPS, f"train.adamw_impl={impl}"))
    assert run[2].optimizer.optimizer.defaults[flag] is (impl != "for_loop")
    assert not run[2].optimizer.optimizer.defaults["fused"]
    assert_same_training(run, default_run)


def test_cuda_only_attention_on_cpu_names_the_key(tiny_model_dir, tmp_path):
    cfg = tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, *STEPS, "train.attention=efficient")
    with pytest.raises(ConfigError, match="train.attention=efficient needs a CUDA device"):
        Trainer(cfg).run()


def test_adamw_impl_with_8bit_adamw_is_refused(tiny_model_dir, tmp_path):
    from dreamtune.training.optim import adamw_impl_kwargs

    cfg = tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, "train.optimizer=adamw8bit",
                          "train.adamw_impl=fused")
    with pytest.raises(ConfigError, match="train.adamw_impl=fused applies to train.optimizer=adamw only"):
        adamw_impl_kwargs(cfg.train)


@pytest.mark.slow
def test_compiled_unet_trains_alike(default_run, tiny_model_dir, tmp_path):
    run = run_recording(tiny_run_config("tiny_lora.yaml", tiny_model_dir, tmp_path, *STEPS, "train.compile=true"))
    assert run[2].models.unet._compiled_call_impl is not None
    assert_same_training(run, default_run, rtol=1e-3, atol=1e-4)
