"""The archive checkpoint store: round trip through fsspec, atomic naming, safe restore."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from agent.checkpoints.legacy_archive import ArchiveCheckpointStore
from agent.errors import CheckpointError, UnsafeArchive


def _fill(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "file.txt").write_text("hello")
    (root / "top.bin").write_bytes(os.urandom(4096))
    os.symlink("a/b/file.txt", root / "link")
    (root / "script.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "script.sh", 0o750)


@pytest.mark.parametrize("scheme", ["plain", "file", "memory"])
async def test_round_trip(tmp_path: Path, scheme: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _fill(src)
    base = {
        "plain": str(tmp_path / "store"),
        "file": f"file://{tmp_path / 'store'}",
        "memory": f"memory://ckpt-test-{os.getpid()}",
    }[scheme]
    store = ArchiveCheckpointStore(base, tmp_path / "tmp")
    saved = await store.save("abcd0001", src)
    assert saved.key.startswith("abcd0001/") and saved.key.endswith(".tar.gz")
    assert saved.size_bytes > 0 and saved.saved_at > 0
    assert store.fs.exists(saved.uri) or store.fs.exists(store.fs._strip_protocol(saved.uri))
    # Complete or absent: nothing is left under a temporary name.
    listing = store.fs.find(store.base_path)
    assert not [p for p in listing if p.endswith(".partial")]
    if scheme != "memory":
        assert saved.uri.startswith("file://")
    target = tmp_path / "target"
    await ArchiveCheckpointStore(base, tmp_path / "tmp").restore(saved.uri, target)
    assert (target / "a" / "b" / "file.txt").read_text() == "hello"
    assert (target / "top.bin").read_bytes() == (src / "top.bin").read_bytes()
    assert os.readlink(target / "link") == "a/b/file.txt"
    assert (target / "script.sh").stat().st_mode & 0o777 == 0o750
    # Two saves never share a key.
    again = await store.save("abcd0001", src)
    assert again.key != saved.key


async def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    store = ArchiveCheckpointStore(str(tmp_path / "store"), tmp_path / "tmp")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        await store.restore(f"file://{tmp_path}/store/nope.tar.gz", tmp_path / "t")


async def test_save_of_a_missing_directory_fails(tmp_path: Path) -> None:
    store = ArchiveCheckpointStore(str(tmp_path / "store"), tmp_path / "tmp")
    with pytest.raises(CheckpointError):
        await store.save("abcd0002", tmp_path / "does-not-exist")


def _archive(path: Path, *members: tarfile.TarInfo) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            data = b"x" * m.size if m.isfile() else None
            tar.addfile(m, io.BytesIO(data) if data is not None else None)


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 3
    return info


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([_file("ok.txt"), _file("../escape.txt")], "'..'"),
        ([_file("a/../../escape.txt")], "'..'"),
        ([_file("/tmp/absolute.txt")], "absolute"),
        ([_link("evil", "../../outside", tarfile.SYMTYPE)], "symlink"),
        ([_link("evil", "/etc/passwd", tarfile.SYMTYPE)], "symlink"),
        ([_link("hard", "/etc/passwd", tarfile.LNKTYPE)], "hard link"),
        ([_device("null")], "device"),
    ],
)
async def test_restore_refuses_malicious_archives(
    tmp_path: Path, members: list[tarfile.TarInfo], reason: str
) -> None:
    archive = tmp_path / "store" / "evil.tar.gz"
    archive.parent.mkdir()
    _archive(archive, *members)
    target = tmp_path / "deep" / "target"
    store = ArchiveCheckpointStore(str(tmp_path / "store"), tmp_path / "tmp")
    with pytest.raises(UnsafeArchive, match=reason):
        await store.restore(str(archive), target)
    # Refused before anything was written, inside or outside the target.
    assert not target.exists() or not any(target.iterdir())
    assert not (tmp_path / "deep" / "escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()
    assert not Path("/tmp/absolute.txt").exists()
