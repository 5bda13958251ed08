"""`dreamtune inspect`: what a .safetensors file or diffusers folder is (checkpoint, LoRA, TI), human or --json."""

from __future__ import annotations

import argparse
import json

from .common import fail


def _human(info: dict) -> str:
    """A few readable lines from :func:`dreamtune.weights.describe.describe`."""
    lines = [f"{info['path']}: {info['kind']} ({info['layout']})",
             f"  size {info['size_bytes'] / 2**20:.1f} MiB, {info['tensors']} tensors, "
             f"{info['parameters']:,} parameters"]
    if "dtypes" in info:
        lines.append(f"  dtypes: {info['dtypes']}")
    for key in ("algorithms", "ranks", "alphas", "modules", "conv_modules", "targets", "bundled_embeddings", "vectors",
                "dim", "token", "pipeline"):
        if key in info:
            lines.append(f"  {key}: {info[key]}")
    for name, part in info.get("components", {}).items():
        lines.append(f"  {name}: {part}")
    if info.get("loads_in"):
        lines.append("  loads in:")
        lines += [f"    {tool}: {verdict}" for tool, verdict in info["loads_in"].items()]
    for key, value in sorted(info.get("metadata", {}).items()):
        lines.append(f"  meta {key} = {value if len(value) < 120 else value[:117] + '...'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..weights.describe import describe

    try:
        info = describe(args.path, allow_pickle=args.allow_pickle)
    except (ValueError, FileNotFoundError) as err:
        return fail(str(err))
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else _human(info))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="tell what a weight file or diffusers folder is")
    p.add_argument("path", help="a .safetensors file (or .ckpt/.pt with --allow-pickle) or a diffusers folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--allow-pickle", action="store_true", help="accept .ckpt/.pt/.bin (torch weights_only load)")
    p.set_defaults(func=run, checks_environment=False)  # reads files only
