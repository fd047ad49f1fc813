"""Checkpoint engine: backend conformance and round trips on memory://, file:// and S3."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.checkpoints import engine as E
from agent.checkpoints.backend import open_backend
from agent.checkpoints.pack import CorruptPack
from agent.checkpoints.repo import split_checkpoint_uri
from agent.errors import CheckpointError
from tests import s3_server as _s3

# The S3 server and the per-backend repository fixtures, shared with other test modules.
s3_server = _s3.s3_server
store = _s3.store

ROOT = os.geteuid() == 0
Store = tuple[str, dict[str, Any] | None]


# Files written this long before a backup are trusted from their stat by the next
# incremental (the engine re-reads those changed within a clock tick of its walk).
_SETTLE = 0.05


def snapshot_tree(root: Path, times: bool = True) -> dict[str, tuple[Any, ...]]:
    """Everything a checkpoint must carry, per path (inode numbers become link groups)."""
    out: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [".", *sorted(dirnames), *sorted(filenames)]:
            if name == "." and dirpath != str(root):
                continue
            p = os.path.join(dirpath, name) if name != "." else dirpath
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            try:
                xa = {
                    k: os.getxattr(p, k, follow_symlinks=False)
                    for k in os.listxattr(p, follow_symlinks=False)
                }
            except OSError:
                xa = {}
            kind: tuple[Any, ...]
            if stat.S_ISREG(st.st_mode):
                first = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 else rel
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                kind = ("file", st.st_size, digest, first)
            elif stat.S_ISLNK(st.st_mode):
                kind = ("symlink", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                kind = ("dir",)
            elif stat.S_ISCHR(st.st_mode):
                kind = ("chr", st.st_rdev)
            elif stat.S_ISFIFO(st.st_mode):
                kind = ("fifo",)
            else:
                kind = ("other",)
            mode = None if stat.S_ISLNK(st.st_mode) else stat.S_IMODE(st.st_mode)
            mt = st.st_mtime_ns if times and rel != "." else None
            out[rel] = (*kind, mode, st.st_uid, st.st_gid, mt, tuple(sorted(xa.items())))
    return out


def make_rich_tree(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (root / "etc/empty").write_bytes(b"")
    (root / "bin").mkdir(mode=0o755)
    exe = root / "bin/tool"
    exe.write_bytes(b"#!/bin/sh\necho hi\n" * 100)
    exe.chmod(0o4755)
    (root / "bin/python").symlink_to("/usr/bin/python3")
    (root / "bin/rel").symlink_to("tool")
    (root / "bin/dangling").symlink_to("missing/file")
    os.link(exe, root / "bin/tool-hardlink")
    (root / "data").mkdir(mode=0o750)
    (root / "data/random.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "data/text.txt").write_text("hello world\n" * 50_000)
    # Sparse: 64 MiB with two small data islands.
    with open(root / "data/sparse.img", "wb") as f:
        f.truncate(64 << 20)
        f.seek(10 << 20)
        f.write(b"island" * 1000)
        f.seek(50 << 20)
        f.write(os.urandom(4096))
    os.mkfifo(root / "data/pipe")
    os.setxattr(root / "data/text.txt", "user.comment", b"kept")
    (root / "opaque-user").mkdir()
    os.setxattr(root / "opaque-user", "user.overlay.opaque", b"y")
    if ROOT:
        (root / "opaque").mkdir()
        os.setxattr(root / "opaque", "trusted.overlay.opaque", b"y")
        os.setxattr(root / "etc/hosts", "trusted.studio", b"\x00\x01binary")
        os.mknod(root / "etc/deleted-file", stat.S_IFCHR | 0o000, os.makedev(0, 0))
        os.chown(root / "etc/hosts", 1234, 5678)
        os.chown(root / "bin/python", 42, 43, follow_symlinks=False)
        os.chown(root / "data", 1000, 1000)
    os.utime(root / "etc/hosts", ns=(1_000_000_000_123_456_789, 1_000_000_000_123_456_789))
    os.utime(root / "etc", ns=(1_100_000_000_000_000_001, 1_100_000_000_000_000_001))
    os.utime(
        root / "bin/python",
        ns=(1_200_000_000_000_000_000, 1_200_000_000_000_000_000),
        follow_symlinks=False,
    )


# ---------------------------------------------------------------------------------------
# Backend conformance


def test_backend_conformance(store: Store) -> None:
    uri, opts = store
    b = open_backend(uri, opts)
    assert b.list("data/") == []
    with pytest.raises(FileNotFoundError) as ei:
        b.load("data/ab/missing")
    assert b.is_not_exist(ei.value)
    with pytest.raises(FileNotFoundError):
        b.stat("data/ab/missing")
    payload = bytes(range(256)) * 10
    b.save("data/ab/one", payload)
    b.save("data/cd/two", b"2")
    b.save("index/x", b"x")
    assert b.load("data/ab/one") == payload
    assert b.load("data/ab/one", 10, 5) == payload[10:15]
    assert b.load("data/ab/one", len(payload) - 7, 7) == payload[-7:]
    st = b.stat("data/ab/one")
    assert st.size == len(payload)
    assert st.name == "data/ab/one"
    assert [o.name for o in b.list("data/")] == ["data/ab/one", "data/cd/two"]
    assert [o.name for o in b.list("index/")] == ["index/x"]
    b.remove("data/cd/two")
    assert [o.name for o in b.list("data/")] == ["data/ab/one"]
    with pytest.raises(FileNotFoundError):
        b.load("data/cd/two")


# ---------------------------------------------------------------------------------------
# Round trips


async def test_roundtrip_rich_tree(store: Store, tmp_path: Path) -> None:
    uri, opts = store
    src = tmp_path / "upper"
    make_rich_tree(src)
    seen: list[tuple[int, int]] = []
    r = await E.backup(
        uri, "sess-a", src, storage_options=opts, progress=lambda d, t: seen.append((d, t))
    )
    assert r.uri.startswith(uri) and r.files >= 6 and not r.inconsistent
    assert seen and seen[-1][0] == seen[-1][1] > 0
    rep = await E.verify(r.uri, storage_options=opts)
    assert rep.ok, rep.problems
    out = tmp_path / "restored"
    rseen: list[tuple[int, int]] = []
    res = await E.restore(
        r.uri, out, storage_options=opts, progress=lambda d, t: rseen.append((d, t))
    )
    assert rseen[-1][0] == rseen[-1][1] == res.bytes
    assert snapshot_tree(out) == snapshot_tree(src)
    # Sparse files come back sparse (only the islands are allocated).
    assert os.stat(out / "data/sparse.img").st_blocks * 512 < 16 << 20
    if ROOT:
        assert os.stat(out / "etc/deleted-file").st_rdev == 0
        assert os.getxattr(out / "opaque", "trusted.overlay.opaque") == b"y"
    names = [c.uri for c in E.list_checkpoints(uri, "sess-a", storage_options=opts)]
    assert names == [r.uri]


async def test_incremental_uploads_only_new_chunks(store: Store, tmp_path: Path) -> None:
    uri, opts = store
    src = tmp_path / "upper"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}.bin").write_bytes(os.urandom(512 * 1024))
    big = os.urandom(8 << 20)
    (src / "big.bin").write_bytes(big)
    time.sleep(_SETTLE)
    r1 = await E.backup(uri, "s", src, storage_options=opts)
    assert r1.added_bytes > 18 << 20
    # Nothing changed: nothing re-read, only a manifest uploaded.
    r2 = await E.backup(uri, "s", src, r1.uri, storage_options=opts)
    assert r2.read_bytes == 0 and r2.reused_files == 21 and r2.added_bytes < 64 * 1024
    # One small new file, one file rewritten, a few bytes in the middle of the big one.
    (src / "new.bin").write_bytes(os.urandom(100_000))
    (src / "f3.bin").write_bytes(os.urandom(512 * 1024))
    with open(src / "big.bin", "r+b") as f:
        f.seek(4 << 20)
        f.write(b"changed!")
    r3 = await E.backup(uri, "s", src, r2.uri, storage_options=opts)
    assert r3.read_bytes == 100_000 + 512 * 1024 + (8 << 20)
    changed = 100_000 + 512 * 1024
    # The big file's change costs about one chunk (<= max chunk size), not the file.
    assert r3.added_bytes < changed + (4 << 20) + 64 * 1024
    assert r3.added_bytes > changed
    out = tmp_path / "out"
    await E.restore(r3.uri, out, storage_options=opts)
    assert snapshot_tree(out) == snapshot_tree(src)
    # The older checkpoint still restores to the old content.
    out1 = tmp_path / "out1"
    await E.restore(r1.uri, out1, storage_options=opts)
    assert (out1 / "big.bin").read_bytes() == big


async def test_dedup_across_studios(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/repo"
    a = tmp_path / "a"
    a.mkdir()
    blob = os.urandom(6 << 20)
    (a / "shared.bin").write_bytes(blob)
    ra = await E.backup(uri, "studio-a", a)
    # A clone restores the parent and checkpoints under its own id: nothing new uploaded.
    clone = tmp_path / "clone"
    await E.restore(ra.uri, clone)
    rc = await E.backup(uri, "studio-clone", clone, ra.uri)
    assert rc.added_bytes < 64 * 1024
    # An unrelated studio with the same content shares the data too (through the index).
    b = tmp_path / "b"
    b.mkdir()
    (b / "other-name.bin").write_bytes(blob)
    rb = await E.backup(uri, "studio-b", b)
    assert rb.added_bytes < 64 * 1024
    assert len(list((tmp_path / "repo/data").rglob("*"))) == len(
        list((tmp_path / "repo/data").rglob("*"))
    )
    assert (await E.verify(rb.uri)).ok


async def test_large_file(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/repo"
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "large.img", "wb") as f:
        f.truncate(200 << 20)
        f.seek(20 << 20)
        f.write(os.urandom(48 << 20))
        f.seek(150 << 20)
        f.write(b"tail" * 1_000_000)
    t = time.monotonic()
    r = await E.backup(uri, "s", src)
    t_backup = time.monotonic() - t
    assert r.read_bytes == 200 << 20
    assert r.added_bytes < 52 << 20
    out = tmp_path / "out"
    t = time.monotonic()
    await E.restore(r.uri, out)
    t_restore = time.monotonic() - t
    assert snapshot_tree(out) == snapshot_tree(src)
    assert os.stat(out / "large.img").st_blocks * 512 < 80 << 20
    print(f"200 MiB file: backup {t_backup:.2f}s restore {t_restore:.2f}s")


@pytest.fixture
def fast_tmp(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs directory when there is one: 100k-file trees on a busy ext4 disk make the
    timing depend on the journal's writeback (seen: restore 8 s to 40 s), not on us."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="ckpt-test-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_100k_small_files(fast_tmp: Path) -> None:
    tmp_path = fast_tmp
    uri = f"file://{tmp_path}/repo"
    src = tmp_path / "src"
    for d in range(100):
        sub = src / f"d{d:03}"
        sub.mkdir(parents=True)
        for i in range(1000):
            (sub / f"f{i:04}.txt").write_bytes(f"file {d}/{i}\n".encode() * (1 + i % 7))
    time.sleep(_SETTLE)
    t = time.monotonic()
    r = await E.backup(uri, "s", src)
    t_full = time.monotonic() - t
    assert r.files == 100_000
    t = time.monotonic()
    r2 = await E.backup(uri, "s", src, r.uri)
    t_incr = time.monotonic() - t
    assert r2.read_bytes == 0
    out = tmp_path / "out"
    t = time.monotonic()
    await E.restore(r2.uri, out)
    t_restore = time.monotonic() - t
    assert snapshot_tree(out, times=False) == snapshot_tree(src, times=False)
    print(f"100k files: full {t_full:.1f}s, unchanged {t_incr:.1f}s, restore {t_restore:.1f}s")


async def test_file_changing_while_read(tmp_path: Path) -> None:
    """A file rewritten all through its read is stored, flagged as possibly mixing old and
    new writes, and read again by the next incremental (never trusted from its stat)."""
    uri = f"file://{tmp_path}/repo"
    src = tmp_path / "src"
    src.mkdir()
    path = src / "hot.bin"
    size = 32 << 20
    path.write_bytes(b"\x00" * size)
    stop = threading.Event()

    def writer() -> None:
        v = 0
        with open(path, "r+b") as f:
            while not stop.is_set():
                v = (v + 1) % 250 + 1
                f.seek(0)
                f.write(bytes([v]) * size)
                f.flush()

    th = threading.Thread(target=writer)
    th.start()
    try:
        time.sleep(0.05)
        r = await E.backup(uri, "s", src)
    finally:
        stop.set()
        th.join()
    out = tmp_path / "out"
    await E.restore(r.uri, out)
    data = (out / "hot.bin").read_bytes()
    assert len(data) == size
    assert r.inconsistent == ["hot.bin"]
    r2 = await E.backup(uri, "s", src, r.uri)
    assert r2.read_bytes == size and r2.reused_files == 0


# ---------------------------------------------------------------------------------------
# Faults


def _pack_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "data").rglob("*") if p.is_file())


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
async def test_damaged_pack_is_named(tmp_path: Path, damage: str) -> None:
    uri = f"file://{tmp_path}/repo"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(3 << 20))
    r = await E.backup(uri, "s", src)
    [pack] = _pack_files(tmp_path / "repo")
    data = bytearray(pack.read_bytes())
    if damage == "corrupt":
        data[1000] ^= 0xFF
        pack.write_bytes(bytes(data))
    elif damage == "truncate":
        pack.write_bytes(bytes(data[: len(data) // 2]))
    else:
        pack.unlink()
    rep = await E.verify(r.uri)
    assert not rep.ok and rep.bad_packs == [pack.name]
    assert pack.name in rep.problems[0]
    with pytest.raises(CorruptPack) as ei:
        await E.restore(r.uri, tmp_path / "out")
    assert ei.value.pack == pack.name and pack.name in str(ei.value)


async def test_interrupted_backup_is_never_listed(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/repo"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(1 << 20))
    r1 = await E.backup(uri, "s", src)
    (src / "b.bin").write_bytes(os.urandom(1 << 20))
    repo = E.get_repository(uri)
    real_save = repo.backend.save

    def dying_save(name: str, data: bytes, *, overwrite: bool = False) -> None:
        if name.startswith("manifests/"):
            # The agent dies after the data, before the manifest.
            raise KeyboardInterrupt
        real_save(name, data, overwrite=overwrite)

    repo.backend.save = dying_save  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            await E.backup(uri, "s", src, r1.uri)
    finally:
        repo.backend.save = real_save  # type: ignore[method-assign]
    assert [c.uri for c in E.list_checkpoints(uri)] == [r1.uri]
    assert E.latest_checkpoint(uri, "s") == r1.uri
    assert (await E.verify(r1.uri)).ok


async def test_missing_checkpoint(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/repo"
    E.get_repository(uri)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        await E.restore(f"{uri}/manifests/s/nope", tmp_path / "out")
    base, sess, key = split_checkpoint_uri(f"{uri}/manifests/s/k1")
    assert (base, sess, key) == (uri, "s", "k1")


async def test_incremental_sees_metadata_changes_and_reuses_the_rest(tmp_path: Path) -> None:
    """Unchanged entries are taken from the parent as they are (no read, no listxattr);
    anything that moves an inode's ctime is looked at again, whether the parent manifest
    comes from this process's cache or from the store."""
    uri = f"file://{tmp_path}/repo"
    src = tmp_path / "upper"
    make_rich_tree(src)
    (src / "keep").mkdir()
    for i in range(50):
        (src / f"keep/f{i}.txt").write_text(f"unchanged {i}\n" * 100)
    time.sleep(_SETTLE)
    r1 = await E.backup(uri, "s", src)
    r2 = await E.backup(uri, "s", src, r1.uri)
    assert r2.read_bytes == 0 and r2.added_bytes < 64 * 1024
    # Metadata-only changes: content and size stay the same.
    (src / "etc/empty").chmod(0o600)
    os.setxattr(src / "keep/f1.txt", "user.tag", b"new")
    os.utime(src / "keep/f2.txt", ns=(1_300_000_000_000_000_000, 1_300_000_000_000_000_000))
    (src / "bin/rel").unlink()
    (src / "bin/rel").symlink_to("python")
    (src / "keep").chmod(0o700)
    os.removexattr(src / "opaque-user", "user.overlay.opaque")
    time.sleep(_SETTLE)
    r3 = await E.backup(uri, "s", src, r2.uri)
    # Only the files whose inode changed are read again.
    assert r3.read_bytes == (src / "keep/f1.txt").stat().st_size * 2
    assert r3.reused_files == r2.reused_files - 3
    out = tmp_path / "out"
    await E.restore(r3.uri, out)
    assert snapshot_tree(out) == snapshot_tree(src)

    def entries(u: str) -> list[Any]:
        return [e.to_json() for e in E._load_manifest_uri(u, None).entries]

    # Parent from the store (a fresh process): the same manifest as from the cache.
    cached = await E.backup(uri, "s", src, r3.uri)
    E._repos.clear()
    fresh = await E.backup(uri, "s", src, r3.uri)
    assert cached.read_bytes == fresh.read_bytes == 0
    assert entries(cached.uri) == entries(fresh.uri) == entries(r3.uri)


async def test_manifest_of_an_earlier_encoding_restores(tmp_path: Path) -> None:
    """Manifests written before entries' texts were reused (one json.dumps, zstd level 6)
    still restore, and serve as the parent of an incremental."""
    import json

    import zstandard

    uri = f"file://{tmp_path}/repo"
    src = tmp_path / "upper"
    make_rich_tree(src)
    time.sleep(_SETTLE)
    r1 = await E.backup(uri, "s", src)
    m = E._load_manifest_uri(r1.uri, None)
    doc = {
        "version": 1,
        "session": m.session_id,
        "key": m.key,
        "created_ns": m.created_ns,
        "parent": m.parent,
        "chunker": m.chunker,
        "stats": m.stats,
        "packs": m.packs,
        "entries": [e.to_json() for e in m.entries],
    }
    old = zstandard.ZstdCompressor(level=6).compress(json.dumps(doc).encode())
    _base, session, key = split_checkpoint_uri(r1.uri)
    repo = E.get_repository(uri)
    repo.backend.save(repo.manifest_name(session, key), old, overwrite=True)
    E._repos.clear()
    out = tmp_path / "out"
    await E.restore(r1.uri, out)
    assert snapshot_tree(out) == snapshot_tree(src)
    r2 = await E.backup(uri, "s", src, r1.uri)
    assert r2.read_bytes == 0


def test_manifest_cache_is_bounded_by_entries(tmp_path: Path, monkeypatch: Any) -> None:
    """The manifests kept for the next backup's parent stay within their entry budget,
    oldest session first, and the newest one is kept whatever its size."""
    from agent.checkpoints import repo as ckpt_repo
    from agent.checkpoints.manifest import Entry, Manifest

    monkeypatch.setattr(ckpt_repo, "MANIFEST_CACHE_ENTRIES", 10)
    repo = E.get_repository(f"file://{tmp_path}/repo")

    def manifest(session: str, key: str, n: int) -> Manifest:
        entries = [Entry(".", "dir"), *(Entry(f"f{i}", "file") for i in range(n - 1))]
        return Manifest(session, key, 0, None, entries, [], {})

    repo.remember_manifest(manifest("a", "k1", 4))
    repo.remember_manifest(manifest("b", "k1", 4))
    assert repo.recent_manifest("a", "k1") is not None
    # A newer checkpoint of a session replaces its older one.
    repo.remember_manifest(manifest("a", "k2", 4))
    assert repo.recent_manifest("a", "k1") is None
    assert repo.recent_manifest("a", "k2") is not None
    # Over budget: the least recently written session goes first.
    repo.remember_manifest(manifest("c", "k1", 4))
    assert repo.recent_manifest("b", "k1") is None
    assert repo.recent_manifest("a", "k2") is not None
    assert repo.recent_manifest("c", "k1") is not None
    # One manifest larger than the budget is still kept, alone.
    repo.remember_manifest(manifest("d", "k1", 50))
    assert repo.recent_manifest("d", "k1") is not None
    assert repo.recent_manifest("a", "k2") is None and repo.recent_manifest("c", "k1") is None


async def test_racily_clean_entries_are_read_again(tmp_path: Path, monkeypatch: Any) -> None:
    """File times move in coarse ticks: a file written again in the tick in which the
    parent's walk read it keeps its size, mtime and ctime. Entries whose ctime is not
    older than the parent's walk by a tick are therefore read again, not trusted."""
    uri = f"file://{tmp_path}/repo"
    src = tmp_path / "upper"
    src.mkdir()
    for name in ("a", "b"):
        (src / name).write_bytes(os.urandom(8192))
    time.sleep(_SETTLE)
    r1 = await E.backup(uri, "s", src)
    # Written well before the walk: trusted.
    r2 = await E.backup(uri, "s", src, r1.uri)
    assert (r2.read_bytes, r2.reused_files) == (0, 2)
    # The same files as if the parent's walk had started within a tick of their writes.
    monkeypatch.setattr(E, "_TICK_NS", 10**15)
    r3 = await E.backup(uri, "s", src, r2.uri)
    assert (r3.read_bytes, r3.reused_files) == (2 * 8192, 0)
    # Read again, they deduplicate: nothing new is stored but the manifest.
    assert r3.added_bytes < 8192
