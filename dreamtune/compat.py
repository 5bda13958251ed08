"""Known-bad combinations of installed packages, found at start-up before a model loads.

Upstream releases break each other (transformers 5.24 refuses peft < 0.22); a user should read
which package to pin, not a traceback from deep inside a library. Versions come from package
metadata, so the check imports nothing heavy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .errors import EnvironmentProblem

#: The packages the guard and `dreamtune doctor` look at, in the order they are reported.
CORE_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "datasets", "safetensors",
                 "huggingface_hub", "bitsandbytes", "wandb")

#: Set to 1 to start despite a known-bad combination (you have patched one of the packages, say).
SKIP_ENV = "DREAMTUNE_SKIP_VERSION_CHECK"


@dataclass(frozen=True)
class Incompatibility:
    """Packages whose versions all match ``when`` do not work together; ``fix`` is the pip line."""

    when: dict[str, str]
    why: str
    fix: str

    def matches(self, versions: dict[str, str | None]) -> bool:
        for package, spec in self.when.items():
            installed = versions.get(package)
            if installed is None or not SpecifierSet(spec).contains(Version(installed), prereleases=True):
                return False
        return True


KNOWN_BAD: tuple[Incompatibility, ...] = (
    Incompatibility(
        when={"transformers": ">=5.24", "peft": "<0.22"},
        why="transformers 5.24 and later refuse peft < 0.22 for every PEFT integration (LoRA training and loading)",
        fix="pip install 'transformers<5.24'  (or 'peft>=0.22' once it is released)",
    ),
)


def installed_versions(packages: tuple[str, ...] = CORE_PACKAGES) -> dict[str, str | None]:
    """Package -> installed version (None when not installed), read from metadata only."""
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _torchvision_problem(versions: dict[str, str | None]) -> str | None:
    """torchvision that cannot import beside this torch: transformers then fails on every import.

    torch 2.N pairs with torchvision 0.(N+15); a PyPI torchvision (a CUDA build) fails beside a CPU torch.
    """
    torch_v, vision_v = versions.get("torch"), versions.get("torchvision")
    if not torch_v or not vision_v:
        return None
    torch_version, vision_version = Version(torch_v), Version(vision_v)
    paired = vision_version.release[:2] == (0, torch_version.minor + 15) and torch_version.major == 2
    cpu_mismatch = torch_version.local == "cpu" and vision_version.local != "cpu"
    if paired and not cpu_mismatch:
        return None
    why = ("a CUDA build beside the CPU build of torch" if paired else
           f"built for another torch (torch {torch_v} pairs with torchvision 0.{torch_version.minor + 15})")
    return (f"torchvision {vision_v} is {why}: it fails to import and breaks transformers. dreamtune does not "
            "need it: pip uninstall -y torchvision")


def find_problems(versions: dict[str, str | None] | None = None) -> list[str]:
    """One sentence per known-bad combination in ``versions`` (default: what is installed)."""
    if versions is None:
        versions = installed_versions((*CORE_PACKAGES, "torchvision"))
    problems = []
    for bad in KNOWN_BAD:
        if bad.matches(versions):
            found = ", ".join(f"{p} {versions[p]}" for p in bad.when)
            problems.append(f"{found}: {bad.why}. Fix: {bad.fix}")
    if vision := _torchvision_problem(versions):
        problems.append(vision)
    return problems


def check_environment(versions: dict[str, str | None] | None = None) -> None:
    """Raise EnvironmentProblem naming every known-bad combination installed, unless the check is skipped."""
    if os.environ.get(SKIP_ENV) == "1":
        return
    problems = find_problems(versions)
    if problems:
        raise EnvironmentProblem(
            "the installed packages are known not to work together: " + "; ".join(problems)
            + f". Install the tested set with `pip install -c constraints.txt -e .` from the dreamtune checkout "
            f"(or set {SKIP_ENV}=1 to start anyway)."
        )
