"""`dreamtune doctor`: what this machine can run, one verdict per line."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from ..doctor import FAIL, WARN, run_checks

    findings = run_checks(Path(args.output_dir))
    for finding in findings:
        print(finding.line())
    failed = [f for f in findings if f.verdict == FAIL]
    warned = [f for f in findings if f.verdict == WARN]
    if failed:
        print(f"verdict: {len(failed)} problem(s) to fix before training: " + ", ".join(f.topic for f in failed))
        return 1
    print("verdict: ready" + (f" ({len(warned)} warning(s) above)" if warned else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check versions, device, precision, bitsandbytes, disk and hub access")
    p.add_argument("--output-dir", default=".", help="folder whose disk is checked (default: here)")
    p.set_defaults(func=run, checks_environment=False)
