"""The parallel backup pipeline keeps its promises: byte-for-byte round trips, dedup with
the chunker's sizes, the incremental bound, and the write order when an upload fails."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import zstandard

from agent.checkpoints import engine as E
from agent.checkpoints.backend import Backend, ObjectInfo
from agent.checkpoints.index import decode_index
from agent.checkpoints.pack import (
    BLOB_DATA,
    CorruptPack,
    PackEntry,
    compress_blob,
    parse_pack_table,
)
from agent.checkpoints.repo import pack_name
from agent.errors import CheckpointError
from tests import s3_server as _s3

s3_server = _s3.s3_server
store = _s3.store

Store = tuple[str, dict[str, Any] | None]
MiB = 1024 * 1024


def _digests(root: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for dp, _, fns in os.walk(root):
        for fn in fns:
            p = Path(dp) / fn
            data = p.read_bytes()
            out[str(p.relative_to(root))] = (len(data), hashlib.sha256(data).hexdigest())
    return out


def _many_small_few_large(root: Path, rng: random.Random) -> None:
    # Small files below, around and above the chunker's minimum; large ones span several
    # chunks and packs (compressible and not), so both read paths and many packs run.
    for d in range(10):
        sub = root / f"pkg{d:02d}" / "mod"
        sub.mkdir(parents=True)
        for i in range(40):
            n = rng.choice([0, 1, 100, 4096, 65_536, 300_000])
            text = f"def f{i}(x):\n    return x * {d}\n".encode() * (n // 30 + 1)
            (sub / f"m{i}.py").write_bytes(text[:n] if i % 2 else rng.randbytes(n))
    (root / "big").mkdir()
    (root / "big/random.bin").write_bytes(rng.randbytes(21 * MiB + 3))
    (root / "big/text.log").write_bytes(b"line of log text 0123456789\n" * (400_000))
    (root / "big/exactly-max-chunk.bin").write_bytes(rng.randbytes(4 * MiB))


async def test_round_trip_many_small_and_a_few_large(store: Store, tmp_path: Path) -> None:
    uri, opts = store
    src = tmp_path / "src"
    _many_small_few_large(src, random.Random(1))
    # Small packs: many uploads in flight at once, finished in any order.
    r = E.backup_sync(uri, "s", src, storage_options=opts, pack_size=2 * MiB)
    assert r.packs_written > 8
    out = tmp_path / "out"
    await E.restore(r.uri, out, storage_options=opts)
    assert _digests(out) == _digests(src)
    assert (await E.verify(r.uri, storage_options=opts)).ok


async def test_dedup_and_incremental_bound_with_the_chunk_sizes(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/repo"
    rng = random.Random(2)
    src = tmp_path / "src"
    src.mkdir()
    big = rng.randbytes(40 * MiB)
    (src / "big.bin").write_bytes(big)
    (src / "other.bin").write_bytes(rng.randbytes(3 * MiB))
    r1 = await E.backup(uri, "a", src)
    # A second studio with the same content stores nothing new.
    r2 = await E.backup(uri, "b", src)
    assert r2.new_blobs == 0 and r2.packs_written == 0
    # 100 bytes inserted in the middle: content-defined cuts move with the data, so only
    # the chunks around the insertion are new (about one average chunk, at most two max).
    (src / "big.bin").write_bytes(big[: 20 * MiB] + rng.randbytes(100) + big[20 * MiB :])
    r3 = await E.backup(uri, "a", src, r1.uri)
    params = E.get_repository(uri).params
    assert 0 < r3.added_bytes <= 2 * params.max_size + 64 * 1024
    # The incremental bound: 5 MiB of new data costs at most 1.2x in new stored bytes.
    (src / "new.bin").write_bytes(rng.randbytes(5 * MiB))
    r4 = await E.backup(uri, "a", src, r3.uri)
    assert r4.added_bytes <= 1.2 * 5 * MiB
    out = tmp_path / "out"
    await E.restore(r4.uri, out)
    assert _digests(out) == _digests(src)


class _FailNthPack(Backend):
    """The real store, except that the Nth pack upload fails after the earlier ones
    (possibly still in flight) went through."""

    def __init__(self, inner: Backend, n: int):
        self.inner = inner
        self.location = inner.location
        self.n = n
        self.packs = 0
        self.lock = threading.Lock()

    def save(self, name: str, data: bytes, *, overwrite: bool = False) -> None:
        if name.startswith("data/"):
            with self.lock:
                self.packs += 1
                fail = self.packs == self.n
            if fail:
                raise CheckpointError(f"injected failure of pack upload {self.n}")
        self.inner.save(name, data, overwrite=overwrite)

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.load(name, offset, length)

    def stat(self, name: str) -> ObjectInfo:
        return self.inner.stat(name)

    def list(self, prefix: str) -> list[ObjectInfo]:
        return self.inner.list(prefix)

    def remove(self, name: str) -> None:
        self.inner.remove(name)


@pytest.mark.parametrize("n", [1, 3, 7])
def test_failed_upload_leaves_no_manifest_and_no_dangling_index(
    store: Store, tmp_path: Path, n: int
) -> None:
    uri, opts = store
    src = tmp_path / "src"
    _many_small_few_large(src, random.Random(3))
    repo = E.get_repository(uri, opts)
    real = repo.backend
    repo.backend = _FailNthPack(real, n)
    try:
        with pytest.raises(CheckpointError, match=f"pack upload {n}"):
            E.backup_sync(uri, "s", src, storage_options=opts, pack_size=1 * MiB)
    finally:
        repo.backend = real
    assert E.list_checkpoints(uri, "s", storage_options=opts) == []
    assert real.list("manifests/") == []
    # Every index names only packs that are there: the index goes after all its packs.
    for o in real.list("index/"):
        for pack in decode_index(real.load(o.name)).values():
            real.stat(pack_name(pack.pack))
    # The store is usable afterwards, and a retry completes.
    r = E.backup_sync(uri, "s", src, storage_options=opts, pack_size=1 * MiB)
    out = tmp_path / "out"
    E.restore_sync(r.uri, out, storage_options=opts)
    assert _digests(out) == _digests(src)


def test_an_empty_blob_at_a_large_blobs_offset_does_not_end_its_range() -> None:
    # An empty file's blob takes no bytes, so it shares its offset with the next blob:
    # the cause of the 'truncated at blob' failures of the zero-blob prefilter (8a2808c).
    big = PackEntry(b"b" * 32, BLOB_DATA, False, 100, 5000, 5000)
    empty = PackEntry(b"e" * 32, BLOB_DATA, False, 100, 0, 0)
    for order in ([big, empty], [empty, big]):
        [group] = E._ranges(order)
        assert group[-1].offset + group[-1].length == 5100


async def test_empty_files_beside_others_in_many_small_packs(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/repo"
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    for i in range(300):
        (src / f"f{i:03d}").write_bytes(
            b"" if i % 3 == 0 else rng.randbytes(rng.randrange(1, 300_000))
        )
    r = E.backup_sync(uri, "s", src, pack_size=256 * 1024)
    out = tmp_path / "out"
    await E.restore(r.uri, out)
    assert _digests(out) == _digests(src)


async def test_a_corrupt_blob_of_a_file_written_whole_fails_the_restore_naming_it(
    tmp_path: Path,
) -> None:
    uri = f"file://{tmp_path}/repo"
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.bin").write_bytes(random.Random(6).randbytes(5000))
    (src / "bad.bin").write_bytes(random.Random(7).randbytes(6000))
    r = E.backup_sync(uri, "s", src)
    m = E.get_repository(uri).load_manifest("s", r.key)
    [bad] = [e for e in m.entries if e.path == "bad.bin"]
    [blob] = bad.chunks
    [pack] = m.packs
    path = tmp_path / "repo" / pack_name(pack)
    data = bytearray(path.read_bytes())
    [pe] = [pe for pe in parse_pack_table(pack, bytes(data), len(data)) if pe.blob.hex() == blob]
    data[pe.offset + pe.length // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptPack, match=f"blob {blob} does not match its hash") as ei:
        await E.restore(r.uri, tmp_path / "out")
    assert ei.value.pack == pack
    # Nothing of the corrupt blob was written: the file was never created.
    assert not (tmp_path / "out" / "bad.bin").exists()


@pytest.mark.parametrize("nth", [1, 40])
def test_a_compressor_failing_in_a_reader_thread_is_named_and_leaves_no_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nth: int
) -> None:
    uri = f"file://{tmp_path}/repo"
    src = tmp_path / "src"
    _many_small_few_large(src, random.Random(8))
    real = compress_blob
    calls = 0
    lock = threading.Lock()

    def failing(data: bytes | memoryview) -> tuple[bytes, bool]:
        nonlocal calls
        with lock:
            calls += 1
            fail = calls == nth
        if fail:
            raise zstandard.ZstdError("injected compressor failure")
        return real(data)

    monkeypatch.setattr(E, "compress_blob", failing)
    with pytest.raises(CheckpointError, match="ZstdError: injected compressor failure") as ei:
        E.backup_sync(uri, "s", src, pack_size=1 * MiB)
    assert "compressing" in str(ei.value) and str(src) in str(ei.value)
    assert E.list_checkpoints(uri, "s") == []
    repo = E.get_repository(uri)
    for o in repo.backend.list("index/"):
        for pack in decode_index(repo.backend.load(o.name)).values():
            repo.backend.stat(pack_name(pack.pack))
    monkeypatch.setattr(E, "compress_blob", real)
    r = E.backup_sync(uri, "s", src, pack_size=1 * MiB)
    out = tmp_path / "out"
    E.restore_sync(r.uri, out)
    assert _digests(out) == _digests(src)


def test_xattrs_of_files_on_every_read_path_are_kept(tmp_path: Path) -> None:
    """Readers read a file's xattrs through the fd they read it from: small files in
    batches, medium ones (a read pool each), large ones (streamed) and hard links (not
    read at all) keep theirs, and a file whose xattr changes before the next backup
    gets the new value."""
    uri = f"file://{tmp_path}/repo"
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(9)
    sizes = {"small.txt": 100, "medium.bin": 2 * MiB, "large.bin": E.SMALL_FILE + MiB}
    for name, n in sizes.items():
        (src / name).write_bytes(rng.randbytes(n))
        os.setxattr(src / name, "user.size", str(n).encode())
    (src / "plain.txt").write_bytes(b"no xattrs")
    os.link(src / "small.txt", src / "small-link.txt")
    r1 = E.backup_sync(uri, "s", src)
    os.setxattr(src / "medium.bin", "user.size", b"changed")
    r2 = E.backup_sync(uri, "s", src, r1.uri)
    for r, medium in ((r1, str(2 * MiB).encode()), (r2, b"changed")):
        out = tmp_path / f"out-{r.key}"
        E.restore_sync(r.uri, out)
        assert _digests(out) == _digests(src)
        assert os.getxattr(out / "small.txt", "user.size") == b"100"
        assert os.getxattr(out / "small-link.txt", "user.size") == b"100"
        assert os.getxattr(out / "medium.bin", "user.size") == medium
        assert os.getxattr(out / "large.bin", "user.size") == str(E.SMALL_FILE + MiB).encode()
        assert os.listxattr(out / "plain.txt") == []
