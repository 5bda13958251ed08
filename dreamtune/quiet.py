"""Start-up notices from third-party packages that a user cannot act on, filtered by their exact text."""

from __future__ import annotations

import logging

#: (logger name, message start): bitsandbytes looks for an optional hub kernel on every import on
#: CPUs with AVX512-BF16 and logs a warning when the `kernels` package is absent; 4-bit CPU matmul,
#: which dreamtune never uses, is all it would speed up.
NOISE = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class _DropNoise(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_third_party_noise() -> None:
    """Drop the NOISE messages only; every other warning of those loggers still shows. Idempotent."""
    for name, prefix in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropNoise(prefix))
