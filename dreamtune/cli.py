"""`dreamtune` console script: subcommands from dreamtune.commands; `--help` is the reference."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .commands import COMMAND_MODULES
from .commands.common import fail
from .compat import check_environment
from .errors import DreamtuneError
from .registry import registered_methods


def _quiet_libraries() -> None:
    """Keep the libraries' own progress bars and advisory notices out of our output."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)


def build_parser() -> argparse.ArgumentParser:
    methods = ", ".join(sorted(registered_methods()))
    parser = argparse.ArgumentParser(prog="dreamtune", description=f"Fine-tune Stable Diffusion 1.x: {methods}.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f".commands.{name}", __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A DreamtuneError (the user can act on it) prints as one line; any other
    exception is a bug and keeps its traceback."""
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "checks_environment", True):  # every command that loads models
            check_environment()
        return args.func(args)
    except DreamtuneError as err:
        return fail(str(err), code=getattr(err, "exit_code", 2))


if __name__ == "__main__":
    sys.exit(main())
