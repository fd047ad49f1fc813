"""A local store's partial copies: a save that fails (a full disk) leaves none, one
killed mid-write is never an object to readers and is removed by GC once stale."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.checkpoints import engine as E
from agent.checkpoints.backend import StoreUnavailable, open_backend
from agent.checkpoints.gc import gc
from tests.integration import require

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real file system that fills up."""
    require(os.geteuid() == 0, "mounting a small tmpfs to fill needs root")
    where = tmp_path / "tiny"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_full_disk_fails_the_save_by_name_and_leaves_no_partial_copy(tiny_fs: Path) -> None:
    store = open_backend(f"file://{tiny_fs}/repo", attempts=3)
    store.save("index/small", b"fits")
    big = os.urandom(3 << 20)
    with pytest.raises(StoreUnavailable) as err:
        store.save("data/ab/abcd", big)
    assert "save 'data/ab/abcd' after 3 attempts" in str(err.value)
    assert "No space left on device" in str(err.value)
    # Each of the three attempts removed its partial copy: the space is free again,
    # and only the object saved before is there.
    assert _files(tiny_fs / "repo") == ["index/small"]
    store.save("data/cd/cdef", os.urandom(1 << 20))
    assert store.load("data/cd/cdef") and [o.name for o in store.list("data/")] == ["data/cd/cdef"]


_KILLED_SAVE = """
import os, signal, sys
sys.path.insert(0, {root!r})
from agent.checkpoints.backend import open_backend

real_fsync = os.fsync
def die(fd):
    # The bytes are written, the rename not done: SIGKILL here is a crash mid-save.
    os.kill(os.getpid(), signal.SIGKILL)
os.fsync = die
open_backend({uri!r}).save({name!r}, b"half" * 300_000)
"""


async def test_a_save_killed_mid_write_is_invisible_and_gc_removes_it_once_stale(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    uri = f"file://{repo}"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(300_000))
    first = await E.backup(uri, "s1", src)
    # A real process, killed in the middle of saving an index (the object a backup
    # reads first) and of saving a manifest.
    for name in ("index/" + "e" * 64, "manifests/s1/zzzz-killed"):
        script = _KILLED_SAVE.format(root=str(ROOT), uri=uri, name=name)
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=False)
        assert proc.returncode == -signal.SIGKILL
    partials = [f for f in _files(repo) if ".tmp-" in f]
    assert len(partials) == 2 and all(os.path.getsize(repo / f) == 1_200_000 for f in partials)

    # Readers never see them: the repository lists, backs up and restores as before.
    assert [c.key for c in E.list_checkpoints(uri, "s1")] == [first.key]
    (src / "b.txt").write_text("after the crash")
    second = await E.backup(uri, "s1", src, parent=first.uri)
    await E.restore(second.uri, tmp_path / "out")
    assert (tmp_path / "out" / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert (tmp_path / "out" / "b.txt").read_text() == "after the crash"

    # GC keeps a partial copy young enough to be a save in progress...
    report = await gc(uri)
    assert report.deleted_partials == [] and len([f for f in _files(repo) if ".tmp-" in f]) == 2
    # ...and removes it once it is older than any save takes.
    report = await gc(uri, partial_stale_s=0.0)
    assert sorted(report.deleted_partials) == sorted(partials)
    assert report.freed_bytes >= 2 * 1_200_000
    assert [f for f in _files(repo) if ".tmp-" in f] == []
    await E.restore(second.uri, tmp_path / "out2")
    assert (tmp_path / "out2" / "b.txt").read_text() == "after the crash"
