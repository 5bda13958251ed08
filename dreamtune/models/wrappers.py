"""The model inside the wrappers training puts around it (DDP's ``module``, torch.compile's ``_orig_mod``)."""

from __future__ import annotations

from typing import Any

import torch


def bare_module(module: Any) -> Any:
    """``module`` with DDP and torch.compile wrappers stripped, so its ``.config`` and submodules are reachable."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return module
        module = inner
