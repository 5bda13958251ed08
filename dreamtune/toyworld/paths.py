"""Where the toy world's shipped files live: package data beside this module.

The base model, its judge, the four concept images and the benchmark's recipes are installed with
dreamtune (declared as package data in pyproject.toml), so the benchmark finds them the same way
in a source checkout and in an installed wheel. Every function that reads them also takes an
explicit folder, for a model or recipes kept elsewhere.
"""

from __future__ import annotations

from pathlib import Path

#: The toy world's data: ``model/`` (SD 1.x diffusers folder), ``classifier/`` (the judge),
#: ``concept/`` (the four training images) and ``pretrain_report.json``.
TOYWORLD_DIR = Path(__file__).resolve().parent / "assets"
MODEL_DIR = TOYWORLD_DIR / "model"
CLASSIFIER_DIR = TOYWORLD_DIR / "classifier"
CONCEPT_DIR = TOYWORLD_DIR / "concept"
#: One recipe per benchmark entry, named after it (``lora.yaml`` is the entry "lora"). The
#: user-facing names in the repository's configs/ (quickstart_lora.yaml, toyworld_*.yaml) link here.
RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


def find_recipes(folder: Path = RECIPE_DIR) -> dict[str, Path]:
    """Benchmark entry -> recipe file, one per ``*.yaml`` in ``folder``, in file-name order."""
    recipes = {path.stem: path for path in sorted(Path(folder).glob("*.yaml"))}
    if not recipes:
        raise FileNotFoundError(f"{folder}: no benchmark recipes (*.yaml) found")
    return recipes
