"""The built-in training methods, one folder each; importing a folder registers its method."""

from . import dreambooth, lora, pivotal, textual_inversion  # noqa: F401
