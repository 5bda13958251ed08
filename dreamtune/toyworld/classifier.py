"""A small CNN that reads a toy-world image back into its attributes: the benchmark's judge.

It stands in for DINO/CLIP: it says which shape, colour, size, position and background a
generated image shows, so fidelity is a share of correctly classified samples. A judge that must
name one of six shapes names one for anything, so it also learns "none": an empty background, or a
speck too small for any shape to be read. The base draws such specks for words it does not know
(e.g. "a photo of diamond"), and they must not count as the concept.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from .world import (ALL_SHAPES, BACKGROUNDS, COLORS, NEW_SHAPES, POSITIONS, RESOLUTION, SIZES, Scene, random_scene,
                    render, to_array)

#: The shape label of an image that shows no legible shape.
NO_SHAPE = "none"
HEADS = {
    "shape": [*ALL_SHAPES, NO_SHAPE],
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



#: Share of the judge's training images that show no legible shape (half empty, half a speck).
NO_SHAPE_SHARE = 0.1
#: A speck's extent, as a share of the image side: 2-7 px at 32 px, where "small" is 9-11 px.
SPECK_EXTENT = (0.06, 0.22)
#: cross_entropy's ignore_index: the heads an image cannot answer (an empty image has no colour).
UNKNOWN = -100


def scene_labels(scene: Scene) -> dict[str, int]:
    """Each head's label index for a rendered scene."""
    return {name: values.index(getattr(scene, name)) for name, values in HEADS.items()}


def judge_scenes(rng: random.Random, count: int) -> list[Scene]:
    """Scenes over every shape (the new ones too) and every combination: the judge must know them all."""
    return [random_scene(rng, ALL_SHAPES, held_out=frozenset()) for _ in range(count)]


def render_no_shape(scene: Scene, rng: random.Random, empty: bool) -> tuple[Image.Image, dict[str, int]]:
    """An image with no legible shape, and its labels: the background (and a speck's colour and place)."""
    labels = {name: UNKNOWN for name in HEADS}
    labels["shape"] = HEADS["shape"].index(NO_SHAPE)
    labels["background"] = HEADS["background"].index(scene.background)
    if empty:
        return Image.new("RGB", (RESOLUTION, RESOLUTION), BACKGROUNDS[scene.background]), labels
    labels["color"] = HEADS["color"].index(scene.color)
    labels["position"] = HEADS["position"].index(scene.position)
    return render(scene, jitter=rng, extent=rng.uniform(*SPECK_EXTENT)), labels


def judge_examples(rng: random.Random, count: int, no_shape_share: float = NO_SHAPE_SHARE
                   ) -> tuple[list[Image.Image], dict[str, torch.Tensor]]:
    """Rendered training images with their labels: scenes of every shape, and ``no_shape_share`` without one."""
    images, labels = [], []
    for scene in judge_scenes(rng, count):
        if rng.random() < no_shape_share:
            image, label = render_no_shape(scene, rng, empty=rng.random() < 0.5)
        else:
            image, label = render(scene, jitter=rng), scene_labels(scene)
        images.append(image)
        labels.append(label)
    return images, {name: torch.tensor([label[name] for label in labels]) for name in HEADS}


def no_shape_images(rng: random.Random, count: int) -> list[Image.Image]:
    """``count`` images without a legible shape, empty and speck in turn (for the judge's scores)."""
    return [render_no_shape(s, rng, empty=i % 2 == 0)[0] for i, s in enumerate(judge_scenes(rng, count))]


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
        images, targets = judge_examples(rng, batch)
        x = torch.from_numpy(to_array(images))
        if degrade is not None:
            half = batch // 2
            with torch.no_grad():
                x[:half] = degrade(x[:half]).clamp(-1, 1)
        x = x + 0.04 * torch.randn_like(x)
        out = model(x.to(device))
        loss = sum(nn.functional.cross_entropy(out[k], targets[k].to(device), ignore_index=UNKNOWN) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"classifier step {step}: loss {loss.item():.4f}")
    return model.cpu().eval()


def accuracy(model: ToyClassifier, seed: int = 123, count: int = 1000) -> dict[str, float]:
    """Per-attribute accuracy on fresh rendered scenes; ``no_shape``: the share of empty images and
    specks (``count`` // 5 of them) read as no shape."""
    rng = random.Random(seed)
    scenes = judge_scenes(rng, count)
    preds = model.predict([render(s, jitter=rng) for s in scenes])
    scores = {k: float(np.mean([p[k] == getattr(s, k) for p, s in zip(preds, scenes)])) for k in HEADS}
    blanks = no_shape_images(rng, count // 5)
    scores["no_shape"] = float(np.mean([p["shape"] == NO_SHAPE for p in model.predict(blanks)]))
    return scores


def vae_round_trip(vae, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images in [-1, 1] -> the VAE's reconstruction of them, on the CPU: the judge's ``degrade``."""
    return lambda x: vae(x.to(device)).sample.cpu()


@torch.no_grad()
def predict_round_trips(model: ToyClassifier, degrade, images: list[Image.Image]) -> list[dict[str, str]]:
    """The judge's reading of ``images`` after ``degrade`` (a VAE round trip), as 8-bit images again."""
    x = degrade(torch.from_numpy(to_array(images))).clamp(-1, 1)
    pixels = ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return model.predict([Image.fromarray(p) for p in pixels])


@torch.no_grad()
def round_trip_scores(model: ToyClassifier, degrade, seed: int = 321, count: int = 1000) -> dict[str, float]:
    """How the judge reads ``degrade``d (VAE round-tripped) fresh renders, the best a sample can look.

    ``shape``: read right; ``new_shape_recall``: new shapes (the benchmark's concept) read as
    themselves; ``new_shape_false``: base shapes read as a new one; ``no_shape``: empty images and
    specks read as no shape.
    """
    rng = random.Random(seed)
    scenes = judge_scenes(rng, count)
    blanks = no_shape_images(rng, count // 5)
    shapes = [p["shape"] for p in predict_round_trips(model, degrade, [render(s, jitter=rng) for s in scenes])]
    new = [s.shape in NEW_SHAPES for s in scenes]
    return {
        "shape": float(np.mean([p == s.shape for p, s in zip(shapes, scenes)])),
        "new_shape_recall": float(np.mean([p == s.shape for p, s, n in zip(shapes, scenes, new) if n])),
        "new_shape_false": float(np.mean([p in NEW_SHAPES for p, n in zip(shapes, new) if not n])),
        "no_shape": float(np.mean([p["shape"] == NO_SHAPE for p in predict_round_trips(model, degrade, blanks)])),
    }


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
