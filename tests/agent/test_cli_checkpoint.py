"""`studio-agent checkpoint list|verify|restore` as real processes, against a store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.checkpoints import engine as E
from tests import REPO_ROOT
from tests import s3_server as _s3
from tests.s3_server import S3Server

s3_server = _s3.s3_server

CLI = [sys.executable, "-m", "agent.cli", "checkpoint"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(env or os.environ, COLUMNS="200"),
        cwd=REPO_ROOT,
    )


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, str, str, Path]:
    """A file:// store with two checkpoints of session aaaa0001 and one of bbbb0001."""
    base = f"file://{tmp_path}/work/.studios/checkpoints"
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    (src / "sub" / "note.txt").write_text("hello")
    r1 = E.backup_sync(base, "aaaa0001", src)
    (src / "more.txt").write_text("more")
    r2 = E.backup_sync(base, "aaaa0001", src, r1.uri)
    E.backup_sync(base, "bbbb0001", src)
    return base, r1.uri, r2.uri, src


def test_list(store: tuple[str, str, str, Path]) -> None:
    base, r1, r2, _ = store
    p = _run("list", "--store", base, "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert [c["sessionId"] for c in data["checkpoints"]] == ["aaaa0001", "aaaa0001", "bbbb0001"]
    first = data["checkpoints"][0]
    assert first["uri"] == r1 and first["files"] == 2 and first["bytes"] > 3 << 20
    p = _run("list", "--store", base, "--session", "aaaa0001", "--json")
    assert [c["uri"] for c in json.loads(p.stdout)["checkpoints"]] == [r1, r2]
    p = _run("list", "--store", base)
    assert p.returncode == 0 and "aaaa0001" in p.stdout and "bbbb0001" in p.stdout
    p = _run("list", "--store", base + "-nothing-here")
    assert p.returncode == 1 and "no checkpoint repository" in p.stderr


def test_verify_names_the_bad_pack(store: tuple[str, str, str, Path], tmp_path: Path) -> None:
    _, _, r2, _ = store
    p = _run("verify", r2, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ok"] is True
    p = _run("verify", r2)
    assert p.returncode == 0 and "ok" in p.stdout
    # Truncate the biggest pack.
    packs = sorted((tmp_path / "work/.studios/checkpoints/data").rglob("*"), key=_size)
    bad = packs[-1]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    p = _run("verify", r2, "--json")
    assert p.returncode == 1
    out = json.loads(p.stdout)
    assert out["ok"] is False and out["badPacks"] == [bad.name]
    p = _run("verify", r2)
    assert p.returncode == 1 and bad.name in p.stdout.replace("\n", "")
    # Restore refuses it too, naming the pack.
    p = _run("restore", r2, "--target", str(tmp_path / "out"), "--json")
    assert p.returncode == 1 and bad.name in p.stderr


def _size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else -1


def test_restore(store: tuple[str, str, str, Path], tmp_path: Path) -> None:
    _, _, r2, src = store
    target = tmp_path / "out"
    p = _run("restore", r2, "--target", str(target), "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)  # quiet: only the JSON on stdout, no bars anywhere
    assert out["files"] == 3 and p.stderr == ""
    assert (target / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert (target / "sub" / "note.txt").read_text() == "hello"
    assert (target / "more.txt").read_text() == "more"
    again = tmp_path / "out2"
    p = _run("restore", r2, "--target", str(again))
    assert p.returncode == 0 and "restored 3 files" in p.stdout
    # Never into a directory that holds something.
    p = _run("restore", r2, "--target", str(target))
    assert p.returncode == 2 and "not empty" in p.stderr


def test_list_on_s3(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.make_bucket("cli-list")
    base = f"s3://{bucket}/work/.studios/checkpoints"
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(1000))
    r = E.backup_sync(base, "cccc0001", src, storage_options=s3_server.storage_options)
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID=s3_server.key,
        AWS_SECRET_ACCESS_KEY=s3_server.secret,
    )
    p = _run("list", "--store", base, "--json", "--s3-endpoint", s3_server.endpoint, env=env)
    assert p.returncode == 0, p.stderr
    assert [c["uri"] for c in json.loads(p.stdout)["checkpoints"]] == [r.uri]
    p = _run("verify", r.uri, "--json", env=dict(env, STUDIOS_S3_ENDPOINT=s3_server.endpoint))
    assert p.returncode == 0 and json.loads(p.stdout)["ok"] is True
