"""`dreamtune push`: upload a run's final/ files and model card to a Hugging Face Hub model repo."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def upload_plan(run_dir: Path) -> list[tuple[Path, str]]:
    """(local file, path in the repo): the UI file and the diffusers files at the repo's root (where
    ``load_lora_weights``, ``load_textual_inversion`` and ``from_pretrained`` look), variants under
    variants/, and the model card as README.md."""
    from ..errors import DreamtuneError
    from ..training.run_folder import RunFolder

    run = RunFolder(run_dir)
    if not run.final.is_dir() or not any(p.is_file() for p in run.final.rglob("*")):
        raise DreamtuneError(f"{run.final} holds no exported files: the run did not finish (resume it with "
                             f"train.resume=auto), or {run_dir} is not a run folder")
    plan = []
    for folder, prefix in ((run.final, ""), (run.diffusers, ""), (run.variants, "variants/")):
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        plan += [(p, prefix + p.relative_to(folder).as_posix()) for p in files]
    if run.model_card.is_file():
        plan.append((run.model_card, "README.md"))
    targets = [t for _, t in plan]
    if clash := sorted({t for t in targets if targets.count(t) > 1}):
        raise DreamtuneError(f"{run_dir}: {clash[0]} is both a UI file and a diffusers file; rename output.name")
    return plan


def run(args: argparse.Namespace) -> int:
    from ..errors import DreamtuneError

    plan = upload_plan(Path(args.run))
    total = sum(p.stat().st_size for p, _ in plan)
    visibility = "private" if args.private else "public"
    print(f"{'would upload' if args.dry_run else 'uploading'} {len(plan)} files ({total / 2**20:.1f} MiB) to "
          f"{visibility} model repo {args.repo_id}:")
    for path, target in plan:
        print(f"  {target}  ({path.stat().st_size / 2**20:.2f} MiB)")
    if args.dry_run:
        return 0
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise DreamtuneError("HF_HUB_OFFLINE is set: unset it to upload, or pass --dry-run to list the files")
    api = HfApi(token=args.token or os.environ.get("HF_TOKEN"))
    try:
        url = api.create_repo(args.repo_id, private=args.private, exist_ok=True, repo_type="model")
        operations = [CommitOperationAdd(path_in_repo=target, path_or_fileobj=str(path)) for path, target in plan]
        api.create_commit(args.repo_id, operations=operations, commit_message=args.message, repo_type="model")
    except OSError as err:  # huggingface_hub's HTTP and auth errors are OSErrors
        raise DreamtuneError(f"upload to {args.repo_id} failed: {err}. Log in with `hf auth login` or pass --token "
                             "(a write token), and check the repo id") from err
    print(f"uploaded to {url}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a run's final/ files and model card to the Hugging Face Hub")
    p.add_argument("run", help="the run folder (output.dir)")
    p.add_argument("--repo-id", required=True, help="user-or-org/name of the model repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", help="a write token (default: HF_TOKEN or the token `hf auth login` saved)")
    p.add_argument("--message", default="Upload from dreamtune", help="commit message")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; no network")
    p.set_defaults(func=run)
