"""A fourth method, defined here and registered with one line, trains, resumes, exports and writes a card
without any edit to the core; and the core names no method."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from pydantic import Field
from safetensors.torch import load_file

from dreamtune.config import ConfigError, MethodSettings, load_config
from dreamtune.registry import register_method, registered_methods
from dreamtune.training.loop import Trainer, train
from dreamtune.training.method import Exporter, TrainingMethod
from dreamtune.training.run_folder import RunFolder
from dreamtune.weights.safetensors_io import save_safetensors

from .conftest import REPO_ROOT


class AttentionSettings(MethodSettings):
    """``attention_full:``: which attention blocks of the UNet train in full."""

    blocks: list[str] = Field(default_factory=lambda: ["attn1", "attn2"])

    def check_run(self, cfg) -> None:
        if not self.blocks:
            raise ValueError("attention_full.blocks: name at least one attention block (attn1, attn2)")

    def card_settings(self) -> str:
        return f"attention blocks {', '.join(self.blocks)}"


class AttentionExporter(Exporter):
    def write(self, out: RunFolder, modules: dict[str, torch.nn.Module], step: int) -> list[Path]:
        trained = {n: p.detach().cpu() for n, p in modules["unet"].named_parameters() if p.requires_grad}
        out.final.mkdir(parents=True, exist_ok=True)
        return [Path(save_safetensors(trained, out.final / f"{self.cfg.output.name}.safetensors"))]

    def usage(self, final: Path, files: list[Path]) -> str:
        return f"Load `{files[0].name}` into the base UNet with `load_state_dict(..., strict=False)`."


class AttentionMethod(TrainingMethod):
    """Full fine-tune of the UNet's attention layers only."""

    name = "attention_full"
    exporter_class = AttentionExporter

    def setup(self, models, accelerator) -> None:
        super().setup(models, accelerator)
        for name, param in models.unet.named_parameters():
            if any(f".{block}." in name for block in self.cfg.attention_full.blocks):
                param.requires_grad_(True)


register_method("attention_full", AttentionSettings, AttentionMethod)


def attention_config(model_dir: Path, out: Path, *overrides: str):
    return load_config(None, [
        "trainer=attention_full", f"model.pretrained={model_dir}", f"output.dir={out}",
        f"data.instance_dir={REPO_ROOT / 'examples' / 'sks_toy'}", "data.instance_prompt=a photo of sks toy",
        "data.token=sks", "data.resolution=32", "train.batch_size=2", "train.learning_rate=1e-3", "train.seed=3",
        "logging.report_to=[]", "attention_full.blocks=[attn2]", *overrides,
    ])


def unet_state(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def test_a_registered_method_trains_resumes_exports_and_writes_a_card(tiny_model_dir, tmp_path):
    straight = Trainer(attention_config(tiny_model_dir, tmp_path / "straight", "train.max_steps=4",
                                        "train.save_every=0"))
    result = straight.run()
    base, live = unet_state(tiny_model_dir), straight.models.unet.state_dict()
    changed = {k for k in base if not torch.equal(base[k], live[k].cpu())}
    assert changed and all(".attn2." in k for k in changed), sorted(changed)[:5]

    exported = load_file(str(result.exported[0]))
    assert set(exported) == {k for k in base if ".attn2." in k}
    assert all(torch.equal(exported[k], live[k].cpu()) for k in exported)
    card = (result.output_dir / "README.md").read_text()
    assert "A **attention_full** fine-tune" in card and "attention blocks attn2" in card
    assert "Trigger: `sks`" in card and "load_state_dict(..., strict=False)" in card

    # Stopped after 2 steps (a checkpoint at 2), then resumed to 4: the same weights as straight through.
    train(attention_config(tiny_model_dir, tmp_path / "resumed", "train.max_steps=2", "train.save_every=2"))
    resumed = Trainer(attention_config(tiny_model_dir, tmp_path / "resumed", "train.max_steps=4",
                                       "train.save_every=2", "train.resume=auto"))
    resumed.run()
    again = resumed.models.unet.state_dict()
    assert all(torch.equal(live[k], again[k]) for k in changed)


def test_a_registered_method_keeps_its_own_config_rules():
    assert "attention_full" in registered_methods()
    with pytest.raises(ConfigError, match=r"attention_full.blocks: name at least one attention block"):
        load_config(None, ["trainer=attention_full", "attention_full.blocks=[]"])
    with pytest.raises(ConfigError, match=r"unknown key 'attention_full.blockz' \(did you mean attention_full.blocks\?\)"):
        load_config(None, ["trainer=attention_full", "attention_full.blockz=[attn1]"])


CORE = ["dreamtune/training", "dreamtune/config.py", "dreamtune/cli.py", "dreamtune/commands/train.py",
        "dreamtune/registry.py"]


def test_the_core_names_no_method():
    """The loop, config core, model card and CLI ask the method; they never switch on its name."""
    names = re.compile(r"lora|dreambooth|textual.inversion", re.IGNORECASE)
    found = []
    for entry in CORE:
        path = REPO_ROOT / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            for number, line in enumerate(file.read_text().splitlines(), 1):
                if names.search(line):
                    found.append(f"{file.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert found == []
