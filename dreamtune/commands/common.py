"""What every subcommand shares: the one-line error exit."""

from __future__ import annotations

import sys


def fail(message: str, code: int = 2) -> int:
    """Print ``error: message`` to stderr and return the exit code (no traceback for user errors)."""
    print(f"error: {message}", file=sys.stderr)
    return code



def refuse_output_over_input(output: str, inputs: list, in_place: bool, output_is_folder: bool | None = None) -> None:
    """An output path that is one of the inputs would replace it: refused unless ``--in-place``, and always
    when the layout changes (``output_is_folder`` differs from the input: a file would become a folder)."""
    import os
    from pathlib import Path

    from ..errors import WeightsError

    out = Path(output)
    for source in inputs:
        src = Path(source)
        same = out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src))
        if not same:
            continue
        if output_is_folder is not None and output_is_folder != src.is_dir():
            raise WeightsError(f"output {out} is the input itself, and this conversion changes its layout (file <-> "
                               "folder); write to another path")
        if not in_place:
            raise WeightsError(f"output {out} is the input {src}: that would replace the original. Write to another "
                               "path, or pass --in-place to replace it on purpose")
