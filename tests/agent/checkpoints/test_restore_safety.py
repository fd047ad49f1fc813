"""Restore refuses malicious manifests and writes nothing outside the target."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.checkpoints import engine as E
from agent.checkpoints.manifest import Entry, Manifest, encode_manifest
from agent.errors import CheckpointError, UnsafeArchive


def _write_manifest(uri: str, entries: list[Entry], packs: list[str] | None = None) -> str:
    repo = E.get_repository(uri)
    m = Manifest("evil", "k1", 0, None, [Entry(".", "dir", 0o755), *entries], packs or [], {})
    repo.backend.save(repo.manifest_name("evil", "k1"), encode_manifest(m))
    return repo.checkpoint_uri("evil", "k1")


CASES = {
    "dotdot": [Entry("../escaped", "file")],
    "dotdot-inner": [Entry("a", "dir"), Entry("a/../../escaped", "file")],
    "absolute": [Entry("/tmp/escaped", "file")],
    "symlink-then-write-through": [
        Entry("link", "symlink", target="/"),
        Entry("link/escaped", "file"),
    ],
    "symlink-relative-escape": [Entry("up", "symlink", target="../../..")],
    "symlink-dir-then-write": [
        Entry("d", "dir"),
        Entry("d/l", "symlink", target="../.."),
        Entry("d/l/escaped", "file"),
    ],
    "device-node": [Entry("disk", "blockdev")],
    "char-device": [Entry("tty", "chardev")],
    "nul": [Entry("bad\0name", "file")],
    "hardlink-out": [Entry("h", "hardlink", target="../escaped")],
    "hardlink-to-nothing": [Entry("h", "hardlink", target="nothing")],
    "duplicate": [Entry("a", "dir"), Entry("a", "symlink", target="/")],
    "parent-missing": [Entry("no/such/dir/f", "file")],
    "bad-chunk-id": [Entry("f", "file", size=3, chunks=("../../x",))],
    "bad-pack-id": [],
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_restore_refuses(tmp_path: Path, case: str) -> None:
    uri = f"file://{tmp_path}/repo"
    packs = ["../../../etc"] if case == "bad-pack-id" else None
    cp = _write_manifest(uri, CASES[case], packs)
    box = tmp_path / "box"
    target = box / "target"
    target.mkdir(parents=True)
    with pytest.raises(UnsafeArchive):
        await E.restore(cp, target)
    # Nothing written anywhere: not in the target, not beside it, not at /tmp/escaped.
    assert os.listdir(target) == []
    assert os.listdir(box) == ["target"]
    assert not os.path.exists("/tmp/escaped")
    rep = await E.verify(cp)
    assert not rep.ok


async def test_restore_refuses_nonempty_target(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/repo"
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    r = await E.backup(uri, "s", src)
    target = tmp_path / "t"
    target.mkdir()
    (target / "existing").symlink_to("/etc")
    with pytest.raises(CheckpointError, match="not empty"):
        await E.restore(r.uri, target)
    assert os.readlink(target / "existing") == "/etc"
