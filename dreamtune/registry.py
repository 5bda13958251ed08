"""Training methods by name: one `register_method(...)` line makes a method known to the config and the loop.

The built-in methods register themselves in `dreamtune.trainers`; a plugin or a test registers its own
the same way. A method class may be named as "module:Class", so a run imports only its own method.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    """A method's name (also its YAML section), its settings class and its training class."""

    name: str
    settings: type  # a dreamtune.config.MethodSettings subclass
    method: str | type  # the TrainingMethod subclass, or "module:Class" imported on first use

    def method_class(self) -> type:
        if isinstance(self.method, type):
            return self.method
        module_name, class_name = self.method.split(":")
        return getattr(importlib.import_module(module_name), class_name)


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, settings: type, method: str | type) -> MethodSpec:
    """Make ``trainer: name`` and the ``name:`` config section known; registering a name again replaces it."""
    spec = MethodSpec(name, settings, method)
    _METHODS[name] = spec
    return spec


def registered_methods() -> dict[str, MethodSpec]:
    """Every known method, the built-in ones included."""
    importlib.import_module("dreamtune.trainers")  # the built-in register lines
    return dict(_METHODS)


def method_spec(name: str) -> MethodSpec:
    """The spec for ``trainer: name``; an unknown name lists the known ones."""
    methods = registered_methods()
    if name not in methods:
        raise ConfigError(f"trainer: {name!r} is not a trainer; choose one of {', '.join(sorted(methods))}")
    return methods[name]


def create_method(cfg: Any):
    """The training method object for ``cfg.trainer``."""
    return method_spec(cfg.trainer).method_class()(cfg)
