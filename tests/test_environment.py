"""The install contract: the lock, pyproject's ranges, the start-up guard, `dreamtune doctor`, quiet imports."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from dreamtune import compat
from dreamtune.cli import main
from dreamtune.errors import EnvironmentProblem

from .conftest import REPO_ROOT

BROKEN_2026_11_29 = {"torch": "2.13.0+cpu", "diffusers": "0.42.1", "transformers": "5.24.0", "peft": "0.21.2",
                     "accelerate": "1.15.0"}


def _pyproject_requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name.lower().replace("-", "_"): Requirement(d) for d in deps}


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-.]+", "_", name).lower()] = version.strip()
    return pins


def _overlap(a: SpecifierSet, b: SpecifierSet) -> bool:
    """Whether some version satisfies both (exact for the >=, <, <=, >, == forms used in our ranges)."""
    bounds = {Version(s.version) for s in [*a, *b]}
    candidates = set(bounds)
    for v in bounds:
        release = list(v.release) + [0] * (3 - len(v.release))
        candidates |= {Version(".".join(map(str, release[:i] + [release[i] + 1] + [0] * (2 - i)))) for i in range(3)}
        candidates.add(Version(f"{v.base_version}.post1"))
    candidates |= {Version("0.0.1"), Version("9999")}
    return any(a.contains(v, prereleases=True) and b.contains(v, prereleases=True) for v in candidates)


def test_guard_names_the_pin_for_the_combination_that_broke_installs():
    problems = compat.find_problems(BROKEN_2026_11_29)
    assert len(problems) == 1
    assert "transformers 5.24.0, peft 0.21.2" in problems[0] and "pip install 'transformers<5.24'" in problems[0]
    with pytest.raises(EnvironmentProblem, match=r"transformers<5\.24.*constraints\.txt"):
        compat.check_environment(BROKEN_2026_11_29)


def test_guard_passes_the_locked_set_and_each_side_of_the_boundary():
    lock = _lock()
    assert compat.find_problems({p: lock.get(p) for p in compat.CORE_PACKAGES if p != "torch"}) == []
    assert compat.find_problems({**BROKEN_2026_11_29, "transformers": "5.23.0"}) == []
    assert compat.find_problems({**BROKEN_2026_11_29, "peft": "0.22.0"}) == []
    assert compat.find_problems({**BROKEN_2026_11_29, "transformers": "5.25.1"}) != []


@pytest.mark.parametrize("torchvision, bad", [
    ("0.28.0+cpu", False),   # the pair for torch 2.13, CPU build
    ("0.28.0", True),        # the PyPI (CUDA) build beside a CPU torch: fails to import
    ("0.29.1+cpu", True),    # built for torch 2.14
])
def test_guard_refuses_a_torchvision_that_cannot_import(torchvision, bad):
    problems = compat.find_problems({"torch": "2.13.0+cpu", "torchvision": torchvision})
    assert bool(problems) == bad
    if bad:
        assert "pip uninstall -y torchvision" in problems[0]


def test_cli_stops_with_one_line_before_loading_a_model(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(compat.SKIP_ENV, raising=False)
    monkeypatch.setattr(compat, "installed_versions", lambda packages=compat.CORE_PACKAGES: dict(BROKEN_2026_11_29))
    assert main(["make-tiny-model", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the installed packages are known not to work together") and "\n" not in err
    assert not (tmp_path / "m").exists()
    monkeypatch.setenv(compat.SKIP_ENV, "1")
    compat.check_environment(BROKEN_2026_11_29)  # skipped: no exception


def test_pyproject_ranges_exclude_every_known_bad_combination():
    declared = _pyproject_requirements()
    for bad in compat.KNOWN_BAD:
        excluded = [p for p, spec in bad.when.items()
                    if p in declared and not _overlap(declared[p].specifier, SpecifierSet(spec))]
        assert excluded, f"pyproject.toml lets pip resolve {bad.when} ({bad.why})"


def test_overlap_helper_tells_disjoint_ranges_apart():
    assert not _overlap(SpecifierSet(">=5.23,<5.24"), SpecifierSet(">=5.24"))
    assert _overlap(SpecifierSet(">=5.23"), SpecifierSet(">=5.24"))
    assert _overlap(SpecifierSet(">=0.21"), SpecifierSet("<0.22"))


def test_lock_pins_every_dependency_inside_its_declared_range():
    lock, declared = _lock(), _pyproject_requirements()
    assert "torch" not in lock, "torch is chosen per machine (CPU or CUDA build), not locked"
    for name, req in declared.items():
        if name == "torch":
            continue
        assert name in lock, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(Version(lock[name])), f"{name}=={lock[name]} is outside pyproject's {req}"
    assert compat.find_problems(lock) == []


def test_tests_run_on_the_locked_versions():
    """CI installs from constraints.txt; a drifted environment would test another stack than the one shipped."""
    lock = _lock()
    installed = compat.installed_versions()
    drift = {p: (installed[p], lock[p]) for p in compat.CORE_PACKAGES if p in lock and installed[p] != lock[p]}
    assert not drift, f"installed vs locked: {drift}; reinstall with pip install -c constraints.txt -e '.[test]'"


def test_doctor_reports_each_line_with_a_verdict(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "dreamtune.cli", "doctor", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert all(re.match(r"^(ok|warn|fail) ", line) for line in lines[:-1]), lines
    topics = {line.split()[1] for line in lines[:-1]}
    assert {"python", "torch", "diffusers", "transformers", "peft", "accelerate", "combinations", "device",
            "precision", "bitsandbytes", "disk", "hub"} <= topics
    assert "offline" in next(line for line in lines if line.split()[1] == "hub")
    assert lines[-1].startswith("verdict: ready")
    assert "gemm_4bit" not in done.stderr


def test_doctor_fails_a_version_outside_the_declared_range():
    from dreamtune.doctor import FAIL, check_versions

    declared = {"transformers": Requirement("transformers>=5.23,<5.24")}
    findings = {f.topic: f for f in check_versions({"transformers": "5.24.0"}, declared)}
    assert findings["transformers"].verdict == FAIL
    assert "pip install 'transformers<5.24,>=5.23'" in findings["transformers"].detail
    assert findings["peft"].detail.startswith("not installed")


def test_doctor_hub_line_says_unreachable(monkeypatch):
    from huggingface_hub import constants

    from dreamtune.doctor import WARN, check_hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def refuse(url):
        raise OSError("no route")

    finding = check_hub(probe=refuse)
    assert finding.verdict == WARN and "not reachable" in finding.detail


def test_bitsandbytes_kernel_notice_is_dropped_and_other_warnings_kept(caplog):
    import dreamtune  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        logger.warning("a real problem with bitsandbytes")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["a real problem with bitsandbytes"]

