"""A small CNN that reads a toy-world image back into its attributes: the benchmark's judge.

It stands in for DINO/CLIP: it says which shape, colour, size, position and background a
generated image shows, so fidelity is a share of correctly classified samples.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .world import ALL_SHAPES, BACKGROUNDS, COLORS, POSITIONS, SIZES, Scene, random_scene, render, to_array

HEADS = {
    "shape": list(ALL_SHAPES),
    "color": list(COLORS),
    "size": list(SIZES),
    "position": list(POSITIONS),
    "background": list(BACKGROUNDS),
}


class ToyClassifier(nn.Module):
    """Three conv stages over a 32 px image, then one linear head per attribute (``predict`` resizes)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * width * 64, 128), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(labels)) for name, labels in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images) -> list[dict[str, str]]:
        """Attributes of each PIL image (any square size; resized to 32 px)."""
        self.eval()
        x = torch.from_numpy(to_array([im.convert("RGB").resize((32, 32), Image.Resampling.BOX) for im in images]))
        logits = self(x)
        picks = {name: out.argmax(dim=1).tolist() for name, out in logits.items()}
        return [{name: HEADS[name][picks[name][i]] for name in HEADS} for i in range(len(images))]



def labels_of(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([values.index(getattr(s, name)) for s in scenes]) for name, values in HEADS.items()}


def judge_scenes(rng: random.Random, count: int) -> list[Scene]:
    """Scenes over every shape (the new ones too) and every combination: the judge must know them all."""
    return [random_scene(rng, ALL_SHAPES, held_out=frozenset()) for _ in range(count)]


def train_classifier(seed: int = 0, steps: int = 1500, batch: int = 128, degrade=None, log=print,
                     device: str = "cpu") -> ToyClassifier:
    """Train on freshly rendered, jittered scenes; ``degrade`` (a batch -> batch function, e.g. a
    VAE round trip) is applied to half of each batch so the judge also reads blurred samples."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = ToyClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        scenes = judge_scenes(rng, batch)
        x = torch.from_numpy(to_array([render(s, jitter=rng) for s in scenes]))
        if degrade is not None:
            half = batch // 2
            with torch.no_grad():
                x[:half] = degrade(x[:half]).clamp(-1, 1)
        x = x + 0.04 * torch.randn_like(x)
        out = model(x.to(device))
        targets = labels_of(scenes)
        loss = sum(nn.functional.cross_entropy(out[k], targets[k].to(device)) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"classifier step {step}: loss {loss.item():.4f}")
    return model.cpu().eval()


def accuracy(model: ToyClassifier, seed: int = 123, count: int = 1000) -> dict[str, float]:
    """Per-attribute accuracy on fresh rendered scenes."""
    rng = random.Random(seed)
    scenes = judge_scenes(rng, count)
    preds = model.predict([render(s, jitter=rng) for s in scenes])
    return {k: float(np.mean([p[k] == getattr(s, k) for p, s in zip(preds, scenes)])) for k in HEADS}


def save_classifier(model: ToyClassifier, folder: str | Path) -> Path:
    """Weights as safetensors beside a JSON of the label lists."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "classifier.safetensors"))
    (folder / "classifier.json").write_text(json.dumps({"heads": HEADS}, indent=2) + "\n")
    return folder / "classifier.safetensors"


def load_classifier(folder: str | Path) -> ToyClassifier:
    """The judge saved by :func:`save_classifier`; its label lists must match this code's."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / "classifier.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: toy-world classifier missing; run scripts/pretrain_toyworld.py")
    heads = json.loads((folder / "classifier.json").read_text())["heads"]
    if heads != HEADS:
        raise ValueError(f"{folder / 'classifier.json'}: labels differ from this dreamtune's toy world; "
                         "re-run scripts/pretrain_toyworld.py")
    model = ToyClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
