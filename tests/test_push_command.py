"""`dreamtune push`: what goes to the hub (final/ and the model card), dry-run offline, and the upload calls."""

from __future__ import annotations

import pytest

from dreamtune.cli import main


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "diffusers").mkdir(parents=True)
    (run / "final" / "my_lora.safetensors").write_bytes(b"x" * 2048)
    (run / "diffusers" / "pytorch_lora_weights.safetensors").write_bytes(b"y" * 1024)
    (run / "README.md").write_text("# my_lora\n")
    (run / "checkpoints" / "step-000010").mkdir(parents=True)
    (run / "checkpoints" / "step-000010" / "optimizer.bin").write_bytes(b"z")
    return run


def test_dry_run_lists_final_files_and_the_card_only(run_dir, capsys):
    assert main(["push", str(run_dir), "--repo-id", "me/my-lora", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload 3 files" in out and "public model repo me/my-lora" in out
    assert "  my_lora.safetensors" in out and "  pytorch_lora_weights.safetensors" in out
    assert "  README.md" in out and "optimizer" not in out


def test_push_commits_the_plan_in_one_commit(run_dir, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private, exist_ok, repo_type):
            calls["repo"] = (repo_id, private, exist_ok, repo_type)
            return f"https://hub.example/{repo_id}"

        def create_commit(self, repo_id, operations, commit_message, repo_type):
            calls["files"] = sorted(op.path_in_repo for op in operations)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert main(["push", str(run_dir), "--repo-id", "me/my-lora", "--private", "--token", "hf_x"]) == 0
    assert calls == {"token": "hf_x", "repo": ("me/my-lora", True, True, "model"),
                     "files": ["README.md", "my_lora.safetensors", "pytorch_lora_weights.safetensors"]}


def test_push_refuses_offline_and_unfinished_runs(run_dir, tmp_path, capsys):
    assert main(["push", str(run_dir), "--repo-id", "me/x"]) == 2  # the tests run with HF_HUB_OFFLINE=1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    (tmp_path / "empty" / "final").mkdir(parents=True)
    assert main(["push", str(tmp_path / "empty"), "--repo-id", "me/x", "--dry-run"]) == 2
    assert "holds no exported files" in capsys.readouterr().err
