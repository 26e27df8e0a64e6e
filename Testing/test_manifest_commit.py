"""A run's manifest names the commit the run started with, not the one the checkout has moved to
by the time the run ends (an editable install in a checkout someone keeps committing to)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from QGSegmentationLib.engine import manifest

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def commit(repo, message):
    (repo / "file.txt").write_text(message)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "file.txt"], check=True, capture_output=True)
    subprocess.run([*git, "commit", "-q", "-m", message], check=True, capture_output=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    yield tmp_path / "repo"
    manifest.forget_commit()


def test_manifest_keeps_the_commit_remembered_at_the_start(repo, tmp_path):
    first = commit(repo, "first")
    assert manifest.remember_commit(repo) == first
    second = commit(repo, "second")
    assert second != first and manifest.git_commit(repo) == second
    path = manifest.write_manifest(tmp_path / "run", command=["qgseg", "train"], config={}, device="cpu",
                                   seed=0, started=time.time(), status="ok")
    assert json.loads(path.read_text())["git_commit"] == first
    (repo / "file.txt").write_text("edited, not committed")
    assert manifest.git_commit(repo) == second + "-dirty"
