"""The checks behind `dreamtune doctor`: versions, device, precision, 8-bit optimizer, disk and hub.

Each check returns one Finding with a verdict, so a user (or a bug report) sees at a glance what
this machine can run and what to change.
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from .compat import CORE_PACKAGES, find_problems, installed_versions

OK, WARN, FAIL = "ok", "warn", "fail"

#: Free disk under which a warning is given: an SD 1.5 DreamBooth run writes ~2 GiB per checkpoint
#: and ~6 GiB of exports.
LOW_DISK_BYTES = 10 * 2**30


@dataclass
class Finding:
    verdict: str  # ok | warn | fail
    topic: str
    detail: str

    def line(self) -> str:
        return f"{self.verdict:<5} {self.topic:<16} {self.detail}"


def declared_requirements() -> dict[str, Requirement]:
    """dreamtune's own dependency ranges (pyproject), by normalised package name."""
    try:
        lines = metadata.requires("dreamtune") or []
    except metadata.PackageNotFoundError:
        return {}
    reqs = [Requirement(line) for line in lines]
    return {r.name.lower().replace("-", "_"): r for r in reqs if r.marker is None}


def check_versions(versions: dict[str, str | None] | None = None,
                   declared: dict[str, Requirement] | None = None) -> list[Finding]:
    """One line per core package: installed, and inside the range dreamtune declares."""
    versions = installed_versions() if versions is None else versions
    declared = declared_requirements() if declared is None else declared
    findings = [Finding(OK, "python", platform.python_version())]
    for package in CORE_PACKAGES:
        installed = versions.get(package)
        req = declared.get(package.lower().replace("-", "_"))
        wanted = str(req.specifier) if req is not None and req.specifier else "any"
        if installed is None:
            findings.append(Finding(FAIL if req is not None else WARN, package,
                                    f"not installed (dreamtune needs {wanted})"))
        elif req is not None and not req.specifier.contains(Version(installed), prereleases=True):
            findings.append(Finding(FAIL, package, f"{installed}, outside the tested range {wanted}: "
                                                   f"pip install '{package}{req.specifier}'"))
        else:
            findings.append(Finding(OK, package, installed))
    return findings


def check_combinations(versions: dict[str, str | None] | None = None) -> list[Finding]:
    problems = find_problems(versions)
    if not problems:
        return [Finding(OK, "combinations", "no known-bad combination of the installed packages")]
    return [Finding(FAIL, "combinations", problem) for problem in problems]


def check_device() -> list[Finding]:
    """Which accelerator trains, and which mixed precisions it supports."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        bf16 = torch.cuda.is_bf16_supported()
        return [
            Finding(OK, "device", f"cuda: {torch.cuda.device_count()} x {name}, {memory:.1f} GiB, "
                                  f"CUDA {torch.version.cuda}"),
            Finding(OK if bf16 else WARN, "precision",
                    "fp16 and bf16" if bf16 else "fp16 only: bf16 needs an Ampere (sm_80) or newer GPU"),
        ]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return [Finding(WARN, "device", "mps (Apple GPU): trains, but bitsandbytes and fp16 mixed precision "
                                        "are not available there"),
                Finding(OK, "precision", "no mixed precision; bf16 where the OS supports it")]
    cpu = platform.processor() or platform.machine()
    return [
        Finding(WARN, "device", f"cpu only ({cpu}, {os.cpu_count()} cores, torch {torch.__version__}): "
                                "fine for the tiny models, far too slow for SD 1.5; install the CUDA build of torch on a GPU machine"),
        Finding(OK, "precision", "mixed_precision no or bf16 (fp16 training needs a GPU)"),
    ]


def check_bitsandbytes() -> Finding:
    """train.optimizer=adamw8bit works only where one 8-bit AdamW step runs."""
    try:
        import bitsandbytes as bnb
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        param = torch.nn.Parameter(torch.ones(4096, device=device))
        optimizer = bnb.optim.AdamW8bit([param], lr=1e-3)
        param.grad = torch.ones_like(param)
        optimizer.step()
    except Exception as err:  # a missing native library raises several kinds
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return Finding(WARN, "bitsandbytes", f"8-bit AdamW unavailable ({detail[:160]}); use train.optimizer=adamw")
    return Finding(OK, "bitsandbytes", f"{bnb.__version__}: an 8-bit AdamW step ran on {device}")


def check_disk(folder: Path) -> Finding:
    folder = folder if folder.exists() else Path.cwd()
    free = shutil.disk_usage(folder).free
    detail = f"{free / 2**30:.1f} GiB free in {folder.resolve()}"
    if free < LOW_DISK_BYTES:
        return Finding(WARN, "disk", detail + f" (under {LOW_DISK_BYTES / 2**30:.0f} GiB: an SD 1.5 DreamBooth run "
                                              "with checkpoints and exports may not fit)")
    return Finding(OK, "disk", detail)


def check_hub(probe: Callable[[str], None] | None = None) -> Finding:
    """Offline mode, or whether the hub answers: hub ids need it, local folders and files do not."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return Finding(WARN, "hub", "offline (HF_HUB_OFFLINE=1): local folders, single files and the cache load; "
                                    "hub ids not yet downloaded do not")
    endpoint = constants.ENDPOINT

    def head(url: str) -> None:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5)

    try:
        (probe or head)(endpoint)
    except Exception as err:
        return Finding(WARN, "hub", f"{endpoint} not reachable ({type(err).__name__}); hub ids will fail to "
                                    "download: use local folders or files, or set HF_HUB_OFFLINE=1 with a filled cache")
    return Finding(OK, "hub", f"{endpoint} reachable")


def run_checks(output_dir: Path) -> list[Finding]:
    """Every check, in report order."""
    versions = installed_versions((*CORE_PACKAGES, "torchvision"))
    return [*check_versions(versions), *check_combinations(versions), *check_device(), check_bitsandbytes(),
            check_disk(output_dir), check_hub()]
