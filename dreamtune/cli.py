"""`dreamtune` console script: subcommands from dreamtune.commands; `--help` is the reference."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .commands import COMMAND_MODULES


def _quiet_libraries() -> None:
    """Keep the libraries' own progress bars and advisory notices out of our output."""
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dreamtune", description="Fine-tune Stable Diffusion 1.x: DreamBooth, LoRA, Textual Inversion."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f".commands.{name}", __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    if getattr(args, "checks_environment", True):  # every command that loads models
        from .commands.common import fail
        from .compat import check_environment
        from .errors import EnvironmentProblem

        try:
            check_environment()
        except EnvironmentProblem as err:
            return fail(str(err))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
