"""What every subcommand shares: the one-line error exit."""

from __future__ import annotations

import sys


def fail(message: str, code: int = 2) -> int:
    """Print ``error: message`` to stderr and return the exit code (no traceback for user errors)."""
    print(f"error: {message}", file=sys.stderr)
    return code

