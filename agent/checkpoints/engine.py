"""Backup, restore and verify of one checkpoint: the engine behind the checkpoint store.

Blocking work (walking, reading, hashing, compressing, object-store calls) runs in
worker threads; the async functions at the bottom are what the agent awaits. hashlib,
blake3, zstd and file I/O release the GIL, so a small thread pool keeps both the disk
and the network busy.

The backup pipeline: the walk hands each file to the readers as it finds it; a reader
reads, cuts (FastCDC), hashes (blake3) and compresses (zstd level 1, GIL released) its
chunks into the shared pack; a full pack goes to the upload pool (4 puts in flight).
Memory is bounded: at most upload_concurrency + 1 packs (5 x 16 MiB) wait or fly, one
pack fills, and each of the 6 readers (4 for large files, 2 for small ones on 2 cores)
holds one file of at most SMALL_FILE (8 MiB) or one chunk (at most 4 MiB) of a larger
one, with its compressed copy: about 150 MiB with the defaults. Write order: every
pack upload is waited for before the index is saved, the manifest last.

Where the time goes (numpy+pandas+scipy venv, 304 MiB in 9,111 files, 2 cores shared
with other work at load 4-8; py-spy over all threads and stage timers): a full checkpoint
costs ~3.3 s of CPU (user 2.5-3.0 s, sys 0.6-0.85 s) against ~2.3 s for tar plus
`zstd -1`. Compression is the same work in both (per blob 1.4-1.6 s, the same bytes as one
stream 1.5 s in python-zstandard, 2.0 s in the zstd CLI); blake3 takes 0.25 s, the read
syscalls 0.5 s, and the rest (~1 s) is Python per file (open, fstat, read, fstat, close,
the walk's stat and listxattr, entry bookkeeping) and encoding the manifest. Since then
(issue 18, second pass): small files go through _read_batch in bulk (one lock for the
batch's new blobs, one to add them to the pack, one progress call), a regular file's
xattrs are read by its reader through the open fd (off the walk's thread, one path
lookup less): a full checkpoint's CPU 3.03-3.29 s against 3.19-3.48 s, the two engines
alternated at load 5.5-6.6; the 9,088 small files alone 1.4-1.6 s against 1.7-1.9 s, the
bare open, read, blake3 and zstd of them 1.1-1.5 s. Compressing a batch of small files
as one frame would not help: one frame each costs 0.98 s for those 200 MiB, one frame
for all 1.14 s (zstd's per-frame cost is not where the time goes), so the pack format
stays one independent frame per blob. On a busy host the wall time follows the CPU the
process gets. What is left (bench_checkpoint, three runs at load 2.8-4.5): on file://
our wall time is about our CPU time (3.4-4.1 s CPU in 3.6-5.5 s) where tar and zstd
spend 2.6-3.1 s CPU in 1.5-2.7 s: we use about one core of the two, with the GIL held
~65% of the run (py-spy --gil); the CPU ratio is 1.2-1.4x, the wall ratio 1.7-2.5x. The
next step is less GIL-held work per file (or the small files read, hashed and
compressed in C or in another process), not less compression; fewer reader threads
(2+1 instead of 4+2) changed nothing measurable here. Until the walk fed the readers, they
started only after the walk and the per-entry loop (0.2-0.5 s with both cores waiting);
now the first file is read 0.07 s after the start. On file:// the store fsyncs every
object and its directory: 33 fsyncs in a full checkpoint, 0.8 s in all, of which all but
~0.05 s (the last pack, the index, the manifest) run in the upload threads while reading
goes on, so one batch of fsyncs before the index would only move that work onto the
critical path; the file:// floor copies into the page cache and fsyncs nothing. After
the last read: the last pack's upload, the index and the manifest (encoding 9,111
entries) took 0.3-1 s; the index and the manifest are now encoded while the last pack
uploads (stored after it, in the same order), 0.21-0.24 s at load 4-5.

Tried and not kept (issue 18, third pass): the small files' open, fstat, read, xattrs,
blake3 and zstd in two reader processes (fresh interpreters fed batches of paths over
pipes, returning stats, blob ids and the batch's distinct blobs compressed; dedup and
the pack stayed here). Alternated with this engine in bench_checkpoint on file:// at
load 1.3-1.7, full backup 2.15/2.33/1.85 s against 2.28/2.03/1.81 s: no gain. At that
load the in-process readers already use ~1.6 cores (3.1-3.7 s CPU in 1.8-2.3 s); the
processes add 0.15-0.7 s CPU (two interpreters starting, 0.4-0.5 s once per agent, and
pickling ~100 MiB of compressed blobs), and the parent keeps the walk, the entries and
the pack. The GIL-bound single core seen earlier was at load 4-8, where the wall time
follows the CPU the process is given whichever way it is spread. Noticed there, and
fixed since: the readers opened by path with O_NOFOLLOW, which guards only the last
component, so a directory swapped for a symlink after the walk was followed; the walk,
the readers, xattrs and readlink now all go below the source's fd (safe_open).

On a quiet host (issue 18, fourth pass: load 1.6-2.0 at the start of each run,
bench_checkpoint three times) the full checkpoint was 1.29x, 1.31x and 1.11x the floor on
file:// (1.27-1.50 s against 0.97-1.30 s) and 1.42x, 1.03x and 1.21x on S3, with 1.18-1.41x
its CPU; a stage trace on file:// has the reading done at 1.46-1.53 s of 1.56-1.64 s (the
last pack, the index and the manifest after it take 0.1 s) with 2.5-2.8 s of CPU over
it: both cores busy, so only less CPU makes it faster. Alone on one thread, the 9,108
small files of that tree cost (in the page cache): safe_open and close 0.05-0.06 s;
open, fstat, read, flistxattr and fstat 0.24-0.29 s (0.15 s reading into one reused
buffer instead of a new bytes object each: not worth the buffer's lifetime rules for
~4% of the CPU); blake3 0.10 s; zstd level 1 0.85-1.30 s (as the host's speed moved).
Compression is most of it. zstandard's multi_compress_to_buffer over 256-file batches
took 0.92 s of CPU on one thread and 1.10 s (in 0.72 s) on two, against 0.85 s for a
compress call per file: with two readers on two cores, its threads add CPU, not speed.

zstd levels on
this tree (CPU, stored): 1: 1.42 s, 101.7 MiB; -1: 1.27 s, 115 MiB; -3: 1.07 s,
130 MiB; -5: 0.94 s, 144 MiB: a negative level saves at most a third of the compression
CPU for 13-42% more bytes, so level 1 stays.

Restore: a file whose data is one blob is created, written and given its metadata with
one open (before: an open to create it, one to write it, one for its metadata and a
directory fd); what remains is decompression, the blake3 check of every blob (kept: a
corrupt blob fails the restore naming it) and the kernel's create and write. Before
the first write: the manifest's decoding (0.1-0.2 s for 9,111 entries) and its
validation, with the pack tables fetched meanwhile. On tmpfs the fill is decompression,
blake3, the kernel's create and write and ~5 syscalls of metadata per file; safe_open's
openat2 through ctypes costs 27 us a file against 22 us for a bare os.open (0.05 s in
all), so it stays.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import posixpath
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.checkpoints.backend import StoreUnavailable
from agent.checkpoints.chunker import Chunker
from agent.checkpoints.index import IndexEntry, encode_index
from agent.checkpoints.manifest import (
    Entry,
    Manifest,
    encode_manifest,
    validate,
    validate_packs,
)
from agent.checkpoints.pack import (
    BLOB_DATA,
    TRAILER_SIZE,
    CorruptPack,
    PackEntry,
    PackWriter,
    blob_id,
    compress_blob,
    decompress_blob,
    pack_id,
    parse_pack_table,
    parse_trailer,
)
from agent.checkpoints.repo import (
    CheckpointInfo,
    Repository,
    new_checkpoint_key,
    pack_name,
    split_checkpoint_uri,
)
from agent.checkpoints.safefs import DirFds, safe_open
from agent.checkpoints.store import RestoreCancelled
from agent.errors import CheckpointError, UnsafeArchive

__all__ = [
    "BackupResult",
    "CheckpointInfo",
    "ProgressFn",
    "RestoreCancelled",
    "RestoreResult",
    "VerifyReport",
    "backup",
    "backup_sync",
    "get_repository",
    "latest_checkpoint",
    "list_checkpoints",
    "restore",
    "restore_sync",
    "verify",
    "verify_sync",
]

# (bytes done, bytes total); called from worker threads, at most every 0.1 s plus at the end.
ProgressFn = Callable[[int, int], None]

PACK_SIZE = 16 * 1024 * 1024
# Files up to this size are read in one go and cut in memory (no stream overhead).
SMALL_FILE = 8 * 1024 * 1024
# Files from this size on get a worker thread each; smaller ones are read in batches.
LARGE_FILE = 1024 * 1024
# Two, not one: with one worker the small files (most of a venv's files, a third of its
# bytes) ran on one core while the other idled once the large files were done; more than
# the cores only adds GIL hand-offs (100k small files: 6.6 s on 2 threads, 10.5 s on 4).
SMALL_WORKERS = min(2, os.cpu_count() or 1)
READ_ATTEMPTS = 3
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_IS_ROOT = os.geteuid() == 0

_repos: dict[tuple[str, str], Repository] = {}
_repos_lock = threading.Lock()


def get_repository(
    base_uri: str, storage_options: dict[str, Any] | None = None, *, create: bool = True
) -> Repository:
    """One Repository per base URI, so the index cache survives between checkpoints."""
    key = (base_uri.rstrip("/"), repr(sorted((storage_options or {}).items())))
    with _repos_lock:
        repo = _repos.get(key)
    if repo is None:
        repo = Repository.open(base_uri, storage_options, create=create)
        with _repos_lock:
            _repos[key] = repo
    return repo


class _Progress:
    def __init__(self, fn: ProgressFn | None, total: int = 0):
        self.fn = fn
        self.total = total
        self.done = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.fn is None or now - self._last < 0.1:
                return
            self._last = now
            done, total = self.done, self.total
        self.fn(done, total)

    def finish(self) -> None:
        if self.fn is not None:
            self.fn(self.done, self.total)


# ---------------------------------------------------------------------------------------
# Backup


@dataclass(frozen=True)
class BackupResult:
    key: str
    uri: str
    # Stored bytes of every blob this checkpoint needs, plus its manifest.
    size_bytes: int
    # Bytes this backup uploaded (new packs, index, manifest).
    added_bytes: int
    files: int
    reused_files: int
    read_bytes: int
    new_blobs: int
    packs_written: int
    seconds: float
    # Paths that kept changing while read (stored, but possibly mixing old and new data).
    inconsistent: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for n in names:
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            continue
    return out


def _fxattrs(fd: int) -> dict[str, bytes]:
    """As _xattrs, through a file the reader has open (no second path lookup)."""
    try:
        names = os.listxattr(fd)
    except OSError:
        return {}
    out = {}
    for n in names:
        try:
            out[n] = os.getxattr(fd, n)
        except OSError:
            continue
    return out


# A regular file's xattrs before its reader has read them (with flistxattr on the fd
# it reads from: off the walk's thread, one path lookup less per file). Compared by
# identity, never filled in.
_XATTRS_UNREAD: dict[str, bytes] = {}

# Where data-links appear in a session (relative to its root): never checkpointed,
# even where the runtime only left empty mount point directories behind (podman's upper).
EXCLUDED_DIRS = frozenset({"workspace/data"})


def _mount_points_below(root: str) -> set[str]:
    """Mount points strictly below `root`: a bind mount of a directory of the same file
    system has the same st_dev, so the st_dev check alone would read into it."""
    from agent.host_mounts import mount_points_under

    return {p for p, _ in mount_points_under(root)}


# A name that is gone, or no longer what the walk saw (a symlink now on its way: safe_open
# refuses it with ELOOP, or EXDEV for a path out of the tree).
_GONE = frozenset({errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EXDEV})


def _xattrs_below(root_fd: int, rel: str) -> dict[str, bytes]:
    """As _xattrs for `rel` below `root_fd`, through its parent opened with no symlink
    followed (its own last component is not followed either)."""
    parent, _, name = rel.rpartition("/")
    try:
        pfd = safe_open(root_fd, parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        if err.errno in _GONE:
            return {}
        raise
    try:
        return _xattrs(f"/proc/self/fd/{pfd}/{name}")
    finally:
        os.close(pfd)


def _readlink_below(root_fd: int, rel: str) -> str:
    """The target of symlink `rel` below `root_fd`; FileNotFoundError when it is gone."""
    parent, _, name = rel.rpartition("/")
    try:
        pfd = safe_open(root_fd, parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        if err.errno in _GONE:
            raise FileNotFoundError(err.errno, err.strerror, rel) from None
        raise
    try:
        return os.readlink(name, dir_fd=pfd)
    finally:
        os.close(pfd)


def _walk(root: str, root_fd: int) -> Iterator[tuple[str, os.stat_result]]:
    """Pre-order walk, siblings by name (the manifest's order, so no sort of the whole
    tree afterwards); stays on the root's file system (no mounts), and keeps excluded
    directories and mount points as empty directories. A generator: the backup reads
    the first files while the walk goes on.

    Each directory is listed through an fd opened below `root_fd` with no symlink
    followed (safe_open): the session owns the tree and may swap a directory it listed
    for a symlink to anywhere on the host before the walk goes into it; listing by path
    would then take the agent (root) into that target."""
    st = os.lstat(root)
    yield (".", st)
    root_dev = st.st_dev
    mounts = _mount_points_below(root)
    real_root = os.path.realpath(root)
    isdir = stat.S_ISDIR
    # Depth first with an explicit stack of directory iterators: a directory's subtree
    # is emitted right after it, before its next sibling.
    stack: list[tuple[str, list[tuple[str, os.stat_result | None]], int]] = []

    def listing(rel: str) -> list[tuple[str, os.stat_result | None]]:
        """The directory's names, by name, each with its lstat (taken while the
        directory's fd is open: None for a name gone meanwhile)."""
        try:
            fd = safe_open(root_fd, rel, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            if err.errno in _GONE:
                return []  # removed, or swapped for a symlink, since it was seen
            raise
        try:
            with os.scandir(fd) as it:
                names = sorted(de.name for de in it)
            out: list[tuple[str, os.stat_result | None]] = []
            for name in names:
                try:
                    out.append((name, os.stat(name, dir_fd=fd, follow_symlinks=False)))
                except FileNotFoundError:
                    out.append((name, None))
            return out
        finally:
            os.close(fd)

    stack.append(("", listing(""), 0))
    while stack:
        rel, items, i = stack[-1]
        if i >= len(items):
            stack.pop()
            continue
        name, s = items[i]
        stack[-1] = (rel, items, i + 1)
        r = f"{rel}/{name}" if rel else name
        if s is None:
            continue
        yield (r, s)
        if isdir(s.st_mode):
            if s.st_dev != root_dev or r in EXCLUDED_DIRS:
                # A mount point (data-links): keep the directory, never its content.
                continue
            if mounts and os.path.join(real_root, r) in mounts:
                continue
            stack.append((r, listing(r), 0))


class _Readers:
    """Files handed to the readers as the walk finds them, so reading, hashing,
    compressing and uploading start with the first files instead of after the walk.

    Large files are spread over `threads` workers (hashing and zstd release the GIL);
    small files go in batches (in walk order: a directory's files together) to at most
    two workers, since for them the GIL hand-offs of many threads cost more than the
    reading itself (measured: 100k small files 6.6 s on 2 threads, 10.5 s on 4). Only
    entries wait in the queues; file data is bounded by the packs in flight."""

    BATCH_FILES = 256
    BATCH_BYTES = 4 << 20

    def __init__(self, backup: _Backup, threads: int):
        self.backup = backup
        self.pool = ThreadPoolExecutor(threads, "ckpt-read")
        self.spool = ThreadPoolExecutor(SMALL_WORKERS, "ckpt-read-small")
        self.futures: list[Future[None]] = []
        self.batch: list[Entry] = []
        self.batch_size = 0

    def add(self, e: Entry) -> None:
        if e.size >= LARGE_FILE:
            self.futures.append(self.pool.submit(self.backup._read_file, e))
            return
        if self.batch and (
            len(self.batch) >= self.BATCH_FILES or self.batch_size + e.size > self.BATCH_BYTES
        ):
            self._flush()
        self.batch.append(e)
        self.batch_size += e.size

    def _flush(self) -> None:
        self.futures.append(self.spool.submit(self.backup._read_batch, self.batch))
        self.batch, self.batch_size = [], 0

    def wait(self) -> None:
        """Every file read; the first reader's error is raised."""
        if self.batch:
            self._flush()
        for f in self.futures:
            f.result()

    def close(self) -> None:
        # After an error, files not yet started are not read at all.
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.spool.shutdown(wait=True, cancel_futures=True)


class _Backup:
    def __init__(
        self,
        repo: Repository,
        session_id: str,
        source: str,
        parent: Manifest | None,
        progress: ProgressFn | None,
        threads: int,
        upload_concurrency: int,
        pack_size: int,
    ):
        self.repo = repo
        self.session_id = session_id
        self.source = source
        # The source directory's fd while a backup runs: every open below it goes
        # through safe_open (see _walk).
        self.source_fd = -1
        self.parent = parent
        self.progress = _Progress(progress)
        self.threads = threads
        self.pack_size = pack_size
        self.lock = threading.Lock()
        self.known: dict[bytes, IndexEntry] = {}
        # blob -> (pack id, stored length) once its pack is finished; None while pending
        # in one. Not the PackEntry: a tuple of a str and an int leaves the cyclic GC's
        # lists (see Entry.chunks), one that holds an object stays there.
        self.new_blobs: dict[bytes, tuple[str, int] | None] = {}
        self.writer = PackWriter()
        self.inflight = threading.BoundedSemaphore(upload_concurrency + 1)
        self.upload_pool = ThreadPoolExecutor(upload_concurrency, "ckpt-upload")
        self.uploads: list[Future[None]] = []
        # Packs handed to the upload pool (their ids are known before they are stored):
        # the index and the manifest are encoded from these while the last one uploads.
        self.shipped: dict[str, list[PackEntry]] = {}
        # Packs stored.
        self.new_packs: dict[str, list[PackEntry]] = {}
        self.added = 0
        self.read_bytes = 0
        self.failed: BaseException | None = None
        self.warnings: list[str] = []
        self.inconsistent: list[str] = []
        self._tls = threading.local()

    # -- packs

    def _chunker(self) -> Chunker:
        c = getattr(self._tls, "c", None)
        if c is None:
            c = self._tls.c = Chunker(self.repo.params)
        return c

    def _add_chunk(self, data: memoryview) -> str:
        bid = blob_id(data)
        with self.lock:
            if bid in self.known or bid in self.new_blobs:
                return bid.hex()
            self.new_blobs[bid] = None
        stored, compressed = compress_blob(data)
        full = None
        with self.lock:
            self.writer.add(bid, BLOB_DATA, stored, compressed, len(data))
            if self.writer.size >= self.pack_size:
                full, self.writer = self.writer, PackWriter()
        if full is not None:
            self._ship(full)
        return bid.hex()

    def _ship(self, writer: PackWriter) -> None:
        pid, data, entries = writer.finish()
        with self.lock:
            self.shipped[pid] = entries
            for e in entries:
                self.new_blobs[e.blob] = (pid, e.length)
        # Bounded memory: a reader waits here while too many packs are on the wire.
        self.inflight.acquire()
        if self.failed is not None:
            self.inflight.release()
            raise self.failed
        self.uploads.append(self.upload_pool.submit(self._upload, pid, data, entries))

    def _upload(self, pid: str, data: bytes, entries: list[PackEntry]) -> None:
        try:
            self.repo.backend.save(pack_name(pid), data)
            with self.lock:
                self.new_packs[pid] = entries
                self.added += len(data)
        except BaseException as e:
            self.failed = e
            raise
        finally:
            self.inflight.release()

    # -- files

    def _read_file(self, e: Entry) -> None:
        try:
            self._read_one(e)
        except (CheckpointError, OSError):
            raise
        except Exception as err:
            raise self._codec_failure(e, err) from err

    def _codec_failure(self, e: Entry, err: Exception) -> CheckpointError:
        """zstd or blake3 failing in a reader thread, named: not a bare ZstdError from
        somewhere in the pipeline."""
        return CheckpointError(
            f"checkpoint of {self.source}: chunking, hashing or compressing "
            f"{e.path!r} failed: {type(err).__name__}: {err}"
        )

    def _read_one(self, e: Entry) -> None:
        if self.failed is not None:
            return
        counted = 0
        unread_xattrs = e.xattrs is _XATTRS_UNREAD
        for _attempt in range(READ_ATTEMPTS):
            try:
                # Below the source's fd, no symlink followed on the way: a directory
                # swapped for a symlink since the walk must not lead the agent out.
                fd = safe_open(self.source_fd, e.path, os.O_RDONLY | os.O_NONBLOCK)
            except OSError as err:
                if err.errno in _GONE:
                    e.type = "gone"
                    return
                raise
            try:
                st0 = os.fstat(fd)
                if not stat.S_ISREG(st0.st_mode):
                    e.type = "gone"
                    return
                if unread_xattrs:
                    # Between the two fstats: an xattr set meanwhile moves the ctime.
                    e.xattrs = _fxattrs(fd)
                chunks: list[str] = []
                n = 0
                if st0.st_size <= SMALL_FILE:
                    # One read of size + 1 normally hits EOF at once; more means it grew.
                    buf = os.read(fd, st0.st_size + 1)
                    if len(buf) > st0.st_size:
                        parts = [buf]
                        while b := os.read(fd, 1 << 20):
                            parts.append(b)
                        buf = b"".join(parts)
                    for c in self._chunker().cut_buf(memoryview(buf)):
                        chunks.append(self._add_chunk(c))
                        n += len(c)
                else:
                    with open(fd, "rb", buffering=0, closefd=False) as f:
                        for c in self._chunker().cut_stream(f):
                            chunks.append(self._add_chunk(c))
                            n += len(c)
                            self.progress.add(len(c))
                            counted += len(c)
                st1 = os.fstat(fd)
            finally:
                os.close(fd)
            with self.lock:
                self.read_bytes += n
            if counted < n:
                self.progress.add(n - counted)
                counted = n
            e.chunks = tuple(chunks)
            e.size = n
            e.mtime_ns, e.ctime_ns = st1.st_mtime_ns, st1.st_ctime_ns
            e.mode, e.uid, e.gid = stat.S_IMODE(st1.st_mode), st1.st_uid, st1.st_gid
            same = (st0.st_size, st0.st_mtime_ns, st0.st_ctime_ns) == (
                st1.st_size,
                st1.st_mtime_ns,
                st1.st_ctime_ns,
            )
            if same and n == st1.st_size:
                return
        # Still changing after every attempt: keep the last read, and say so.
        e.inconsistent = True
        with self.lock:
            self.inconsistent.append(e.path)

    def _read_batch(self, batch: list[Entry]) -> None:
        """Small files in bulk: each is opened, read and hashed, then the batch's new
        blobs are reserved under one lock, compressed, and added to the pack under one
        more. Going through _read_file per file cost ~65 us of Python each (locks, the
        progress callback, generators: 0.6 s CPU for a venv's 9,088 small files, as much
        as their blake3 and four times their read syscalls). A file that changed while
        read (or grew past SMALL_FILE) goes through _read_file, which retries it."""
        if self.failed is not None:
            return
        source_fd = self.source_fd
        params = self.repo.params
        min_size = params.min_size
        flags = os.O_RDONLY | os.O_NONBLOCK
        isreg = stat.S_ISREG
        slow: list[Entry] = []
        # (entry, its chunks (views of its data), their blob ids)
        read: list[tuple[Entry, list[memoryview], list[bytes]]] = []
        n = 0
        e = batch[0]
        try:
            for e in batch:
                try:
                    fd = safe_open(source_fd, e.path, flags)
                except OSError as err:
                    if err.errno in _GONE:
                        e.type = "gone"
                        continue
                    raise
                try:
                    st0 = os.fstat(fd)
                    if not isreg(st0.st_mode):
                        e.type = "gone"
                        continue
                    size = st0.st_size
                    if size > SMALL_FILE:
                        slow.append(e)
                        continue
                    buf = os.read(fd, size + 1)
                    xattrs = _fxattrs(fd) if e.xattrs is _XATTRS_UNREAD else e.xattrs
                    st1 = os.fstat(fd)
                finally:
                    os.close(fd)
                if (
                    len(buf) != size
                    or size != st1.st_size
                    or st0.st_mtime_ns != st1.st_mtime_ns
                    or st0.st_ctime_ns != st1.st_ctime_ns
                ):
                    slow.append(e)
                    continue
                e.size = size
                e.xattrs = xattrs
                e.mtime_ns, e.ctime_ns = st1.st_mtime_ns, st1.st_ctime_ns
                e.mode, e.uid, e.gid = stat.S_IMODE(st1.st_mode), st1.st_uid, st1.st_gid
                view = memoryview(buf)
                chunks = [view] if size <= min_size else list(self._chunker().cut_buf(view))
                read.append((e, chunks, [blob_id(c) for c in chunks]))
                n += size
            todo: list[tuple[Entry, bytes, memoryview]] = []
            with self.lock:
                known, new = self.known, self.new_blobs
                for e, chunks, ids in read:
                    for bid, c in zip(ids, chunks, strict=True):
                        if bid not in known and bid not in new:
                            new[bid] = None
                            todo.append((e, bid, c))
                self.read_bytes += n
            stored = []
            # `e` names the file in the error below if zstd fails.
            for e, bid, c in todo:  # noqa: B007
                stored.append((bid, *compress_blob(c), len(c)))
        except (CheckpointError, OSError):
            raise
        except Exception as err:
            raise self._codec_failure(e, err) from err
        full: list[PackWriter] = []
        with self.lock:
            for bid, data, compressed, raw_len in stored:
                self.writer.add(bid, BLOB_DATA, data, compressed, raw_len)
                if self.writer.size >= self.pack_size:
                    full.append(self.writer)
                    self.writer = PackWriter()
        for e, _, ids in read:
            e.chunks = tuple([b.hex() for b in ids])
        self.progress.add(n)
        for w in full:
            self._ship(w)
        for e in slow:
            self._read_file(e)

    # -- the whole run

    def run(self) -> BackupResult:
        t0 = time.monotonic()
        lock = self.repo.take_lock(self.session_id)
        try:
            return self._run(t0)
        finally:
            self.upload_pool.shutdown(wait=True)
            self.repo.release_lock(lock)

    def _run(self, t0: float) -> BackupResult:
        # The lock is taken before the index is read: GC relies on this order.
        self.known, known_ids = self.repo.load_indexes_and_ids()
        walk_started_ns = time.time_ns()
        self.source_fd = os.open(self.source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            items = _walk(self.source, self.source_fd)
            readers = _Readers(self, self.threads)
            try:
                return self._run_walk(t0, walk_started_ns, items, known_ids, readers)
            finally:
                readers.close()
        finally:
            os.close(self.source_fd)

    def _run_walk(
        self,
        t0: float,
        walk_started_ns: int,
        items: Iterator[tuple[str, os.stat_result]],
        known_ids: set[str],
        readers: _Readers,
    ) -> BackupResult:
        prev: dict[str, Entry] = {}
        # Racily clean entries (git's term): a file changed in the same clock tick just
        # after the parent's walk read it keeps its size, mtime and ctime, since file
        # times move in coarse ticks. Only entries whose ctime is older than the parent's
        # walk by more than a tick are trusted from their stat; the rest are read again.
        trusted_before = 0
        if self.parent is not None:
            prev = {p.path: p for p in self.parent.entries}
            trusted_before = _trusted_before(self.parent)
        # A reused file's chunks must all still be stored (GC may have removed some).
        stored = known_ids.issuperset
        fromhex = bytes.fromhex
        entries: list[Entry] = []
        todo: list[Entry] = []
        links: dict[tuple[int, int], str] = {}
        total = 0
        reused = 0
        reused_bytes = 0
        isdir, isreg, islnk, imode = stat.S_ISDIR, stat.S_ISREG, stat.S_ISLNK, stat.S_IMODE
        for rel, st in items:
            mode = st.st_mode
            p = prev.get(rel)
            # Unchanged since the parent (any write, chmod, chown, rename into place or
            # xattr change moves the ctime): the parent's entry is taken as it is.
            if (
                p is not None
                and p.ctime_ns == st.st_ctime_ns
                and p.ctime_ns < trusted_before
                and (p.mtime_ns, p.mode, p.uid, p.gid)
                == (st.st_mtime_ns, imode(mode), st.st_uid, st.st_gid)
            ):
                if isreg(mode):
                    if (
                        st.st_nlink == 1
                        and p.type == "file"
                        and not p.inconsistent
                        and (p.size, p.ino) == (st.st_size, st.st_ino)
                        and stored(p.chunks)
                    ):
                        entries.append(p)
                        total += st.st_size
                        reused += 1
                        reused_bytes += st.st_size
                        continue
                elif (isdir(mode) and p.type == "dir") or (islnk(mode) and p.type == "symlink"):
                    entries.append(p)
                    continue
            # Setting an xattr changes the ctime: same inode, same ctime, same xattrs
            # (one listxattr syscall less per unchanged entry).
            if p is not None and p.ctime_ns == st.st_ctime_ns and p.ino in (0, st.st_ino):
                xattrs = p.xattrs
            elif isreg(mode):
                xattrs = _XATTRS_UNREAD
            else:
                xattrs = _xattrs(self.source) if rel == "." else _xattrs_below(self.source_fd, rel)
            e = Entry(
                path=rel,
                type="dir",
                mode=stat.S_IMODE(mode),
                uid=st.st_uid,
                gid=st.st_gid,
                mtime_ns=st.st_mtime_ns,
                ctime_ns=st.st_ctime_ns,
                xattrs=xattrs,
            )
            if stat.S_ISDIR(mode):
                pass
            elif stat.S_ISREG(mode):
                inode = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and inode in links:
                    e.type, e.target = "hardlink", links[inode]
                    if e.xattrs is _XATTRS_UNREAD:
                        e.xattrs = _xattrs_below(self.source_fd, rel)
                    entries.append(e)
                    continue
                if st.st_nlink > 1:
                    links[inode] = rel
                e.type, e.size, e.ino = "file", st.st_size, st.st_ino
                total += st.st_size
                if (
                    p is not None
                    and p.type == "file"
                    and not p.inconsistent
                    and p.ctime_ns < trusted_before
                    and (p.size, p.mtime_ns, p.ctime_ns, p.ino)
                    == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                    and stored(p.chunks)
                ):
                    e.chunks = p.chunks
                    reused += 1
                    reused_bytes += st.st_size
                else:
                    todo.append(e)
                    # Before the read starts: a reader may set e.size.
                    self.progress.total = total
                    readers.add(e)
            elif stat.S_ISLNK(mode):
                try:
                    e.type, e.target = "symlink", _readlink_below(self.source_fd, rel)
                except FileNotFoundError:
                    continue
            elif stat.S_ISFIFO(mode):
                e.type = "fifo"
            elif stat.S_ISCHR(mode) and st.st_rdev == 0:
                e.type = "whiteout"
            else:
                self.warnings.append(f"skipped {rel!r}: device node or socket")
                continue
            entries.append(e)
        self.progress.total = total
        self.progress.add(reused_bytes)

        readers.wait()
        with self.lock:
            last, self.writer = self.writer, PackWriter()
        if len(last):
            self._ship(last)
        # While the last pack uploads, the index and the manifest are encoded (0.1-0.5 s
        # of the serial tail, with one core idle); they are stored only after every
        # upload is: the write order packs -> index -> manifest holds for any reader.

        # Files that vanished during the walk are dropped, with hard links to them.
        gone = {e.path for e in entries if e.type == "gone"}
        entries = [
            e
            for e in entries
            if e.type != "gone" and not (e.type == "hardlink" and e.target in gone)
        ]

        packs: set[str] = set()
        size = 0
        # Each distinct blob once (set.update runs in C; most files are one chunk).
        distinct: set[str] = set()
        for e in entries:
            if e.chunks:
                distinct.update(e.chunks)
        new_blobs, known_blobs = self.new_blobs.get, self.known.__getitem__
        for c in distinct:
            b = fromhex(c)
            nb = new_blobs(b)
            if nb is not None:
                packs.add(nb[0])
                size += nb[1]
            else:
                ie = known_blobs(b)
                packs.add(ie.pack)
                size += ie.length

        index = encode_index(self.shipped) if self.shipped else None

        key = new_checkpoint_key()
        m = Manifest(
            session_id=self.session_id,
            key=key,
            created_ns=time.time_ns(),
            parent=None
            if self.parent is None
            else self.repo.checkpoint_uri(self.parent.session_id, self.parent.key),
            entries=entries,
            packs=sorted(packs),
            chunker=self.repo.params.to_json(),
            stats={
                "files": len(todo) + reused,
                "bytes": total,
                "stored_bytes": size,
                "walk_started_ns": walk_started_ns,
            },
        )
        mdata = encode_manifest(m)

        for f in self.uploads:
            f.result()
        if self.failed is not None:
            raise self.failed
        self.progress.finish()
        if index is not None:
            if self.shipped.keys() != self.new_packs.keys():
                # Unreachable while every upload is waited for above; the index must
                # never name a pack that is not stored.
                raise CheckpointError(
                    f"checkpoint of {self.source}: "
                    f"{len(self.shipped.keys() - self.new_packs.keys())} packs not stored"
                )
            iid, idata = index
            self.repo.backend.save(f"index/{iid}", idata)
            self.added += len(idata)
        # Last: the checkpoint exists from this moment.
        self.repo.backend.save(self.repo.manifest_name(self.session_id, key), mdata)
        self.repo.remember_manifest(m)
        self.added += len(mdata)
        return BackupResult(
            key=key,
            uri=self.repo.checkpoint_uri(self.session_id, key),
            size_bytes=size + len(mdata),
            added_bytes=self.added,
            files=len(todo) + reused,
            reused_files=reused,
            read_bytes=self.read_bytes,
            new_blobs=sum(len(v) for v in self.new_packs.values()),
            packs_written=len(self.new_packs),
            seconds=time.monotonic() - t0,
            inconsistent=sorted(self.inconsistent),
            warnings=self.warnings,
        )


# How far file times may lag the clock: the kernel stamps them from its coarse clock
# (CLOCK_REALTIME_COARSE, id 5 on Linux; Python does not name it), one jiffy at most.
def _coarse_tick_ns() -> int:
    try:
        return int(time.clock_getres(5) * 1e9)
    except OSError:
        return 0


_TICK_NS = max(2 * _coarse_tick_ns(), 10_000_000)
# Manifests written before the walk's start was recorded: their creation time is after
# their walk, by at most the time a backup takes; this much earlier is trusted.
_OLD_MANIFEST_MARGIN_NS = 120 * 1_000_000_000


def _trusted_before(parent: Manifest) -> int:
    """Entries of `parent` with a ctime before this may be reused on an equal stat."""
    started = parent.stats.get("walk_started_ns")
    if isinstance(started, int) and started > 0:
        return started - _TICK_NS
    return parent.created_ns - _OLD_MANIFEST_MARGIN_NS


def _load_manifest_uri(uri: str, storage_options: dict[str, Any] | None) -> Manifest:
    base, session, key = split_checkpoint_uri(uri)
    repo = get_repository(base, storage_options, create=False)
    try:
        return repo.load_manifest(session, key)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {uri}") from None


def backup_sync(
    base_uri: str,
    session_id: str,
    source_dir: Path | str,
    parent: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    threads: int | None = None,
    upload_concurrency: int = 4,
    pack_size: int = PACK_SIZE,
) -> BackupResult:
    if not session_id or "/" in session_id or session_id in (".", ".."):
        raise CheckpointError(f"bad session id {session_id!r}")
    repo = get_repository(base_uri, storage_options)
    parent_m = None
    if parent:
        try:
            pbase, psession, pkey = split_checkpoint_uri(parent)
            if pbase.rstrip("/") == repo.base_uri:
                parent_m = repo.recent_manifest(psession, pkey)
            if parent_m is None:
                parent_m = _load_manifest_uri(parent, storage_options)
        except CheckpointError:
            # A missing parent only costs re-reading every file.
            parent_m = None
    n = threads or min(8, (os.cpu_count() or 2) * 2)
    b = _Backup(
        repo, session_id, str(source_dir), parent_m, progress, n, upload_concurrency, pack_size
    )
    try:
        return b.run()
    except StoreUnavailable:
        raise
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"checkpoint of {source_dir} failed: {e}") from e


# ---------------------------------------------------------------------------------------
# Reading packs (restore and verify)


def _pack_table(repo: Repository, pack: str) -> tuple[int, list[PackEntry]]:
    name = pack_name(pack)
    try:
        size = repo.backend.stat(name).size
    except FileNotFoundError:
        raise CorruptPack(pack, f"missing from {repo.base_uri}") from None
    if size < TRAILER_SIZE:
        raise CorruptPack(pack, "truncated")
    want = min(size, 256 * 1024)
    tail = repo.backend.load(name, size - want, want)
    n = parse_trailer(pack, tail)
    if n + TRAILER_SIZE > size:
        raise CorruptPack(pack, "truncated (table longer than the object)")
    if n + TRAILER_SIZE > len(tail):
        tail = repo.backend.load(name, size - n - TRAILER_SIZE, n + TRAILER_SIZE)
    return size, parse_pack_table(pack, tail, size)


def _load_range(repo: Repository, pack: str, start: int, length: int) -> bytes:
    """A range of a pack, asked again when it comes back short: a short answer would
    otherwise read as a truncated pack. (No short answer has been seen: the 'truncated
    at blob' failures that prompted this were _ranges ending a range at an empty blob
    that shared its offset with a large one.)"""
    name = pack_name(pack)
    data = b""
    for _attempt in range(READ_ATTEMPTS):
        try:
            data = repo.backend.load(name, start, length)
        except FileNotFoundError:
            raise CorruptPack(pack, f"missing from {repo.base_uri}") from None
        if len(data) == length:
            break
    return data


@functools.lru_cache(maxsize=64)
def _zero_id(n: int) -> bytes:
    return blob_id(bytes(n))


def _is_zero_blob(pe: PackEntry, max_size: int) -> bool:
    """A blob of zeros (or empty): restored as a hole, never fetched. Only a blob that
    compressed to almost nothing can be zeros, so a run of zeros is hashed for those
    alone (hashing one per blob size, each a cache miss, cost as much as hashing the
    data itself); bounded by the chunker's maximum, so a forged table cannot make us
    allocate gigabytes of zeros."""
    if pe.raw_length == 0:
        return True
    return (
        pe.compressed
        and pe.length <= pe.raw_length // 64 + 64
        and pe.raw_length <= max_size
        and pe.blob == _zero_id(pe.raw_length)
    )


def _decode_blob(pack: str, e: PackEntry, stored: bytes | memoryview) -> bytes:
    if len(stored) != e.length:
        raise CorruptPack(pack, f"truncated at blob {e.blob.hex()}")
    try:
        data = decompress_blob(stored, e.compressed, e.raw_length)
    except Exception as err:
        raise CorruptPack(pack, f"blob {e.blob.hex()} does not decompress ({err})") from err
    if len(data) != e.raw_length or blob_id(data) != e.blob:
        raise CorruptPack(pack, f"blob {e.blob.hex()} does not match its hash")
    return data


def _ranges(
    entries: list[PackEntry], gap: int = 1 << 20, cap: int = 32 << 20
) -> list[list[PackEntry]]:
    """Blobs grouped into ranges close enough to fetch with one request."""
    out: list[list[PackEntry]] = []
    for e in sorted(entries, key=lambda x: (x.offset, x.length)):
        if out:
            cur = out[-1]
            start = cur[0].offset
            # Sorted by (offset, length), the last blob ends last even where an empty
            # blob shares its offset with the next one: sorted by offset alone, an empty
            # blob after a large one at the same offset ended the range at that offset
            # and cut the large one short ('truncated at blob').
            end = cur[-1].offset + cur[-1].length
            if e.offset - end <= gap and e.offset + e.length - start <= cap:
                cur.append(e)
                continue
        out.append([e])
    return out


# ---------------------------------------------------------------------------------------
# Restore


@dataclass(frozen=True)
class RestoreResult:
    files: int
    bytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


def _set_xattrs(target: int | str, xattrs: dict[str, bytes], warnings: list[str], rel: str) -> None:
    # Names in warnings as repr: one that is not UTF-8 (lone surrogates) would break the
    # UTF-8 of a log line or of the report's protobuf string.
    for k, v in xattrs.items():
        if not _IS_ROOT and k.startswith(("trusted.", "security.")):
            warnings.append(f"{rel!r}: xattr {k!r} needs root, not restored")
            continue
        try:
            if isinstance(target, int):
                os.setxattr(target, k, v)
            else:
                os.setxattr(target, k, v, follow_symlinks=False)
        except OSError as err:
            warnings.append(f"{rel!r}: xattr {k!r} not restored ({err.strerror})")


class _Restore:
    def __init__(
        self,
        repo: Repository,
        m: Manifest,
        target: str,
        progress: ProgressFn | None,
        threads: int,
        cancel: threading.Event | None = None,
    ):
        self.repo = repo
        self.cancel = cancel
        self.m = m
        self.target = target
        self.progress = _Progress(progress)
        self.threads = threads
        self.warnings: list[str] = []
        self.root_fd = -1
        self.tail_holes: set[str] = set()
        # Files written whole by _fill (one open each), by path.
        self.whole: dict[str, Entry] = {}

    def _check_cancel(self) -> None:
        # Checked between files and between downloaded ranges: a range in flight finishes
        # (a pack at most), so a cancel waits that long, not for the whole checkpoint.
        if self.cancel is not None and self.cancel.is_set():
            raise RestoreCancelled(
                f"restore cancelled after {self.progress.done} of {self.progress.total} bytes"
            )

    def run(self) -> RestoreResult:
        t0 = time.monotonic()
        # The pack ids first (they name objects), then the pack tables are fetched while
        # the entries are checked: nothing is written before both are done.
        validate_packs(self.m)
        with ThreadPoolExecutor(self.threads, "ckpt-restore") as pool:
            table_futures = [pool.submit(_pack_table, self.repo, p) for p in self.m.packs]
            try:
                validate(self.m)
            except BaseException:
                for f in table_futures:
                    f.cancel()
                raise
            tables = dict(zip(self.m.packs, (f.result() for f in table_futures), strict=True))
            blobs: dict[bytes, tuple[str, PackEntry]] = {}
            for pack, (_, pentries) in tables.items():
                for pentry in pentries:
                    blobs.setdefault(pentry.blob, (pack, pentry))
            # pack -> blob -> [(file, offset)]: where each needed blob goes.
            plan: dict[str, dict[bytes, tuple[PackEntry, list[tuple[str, int]]]]] = {}
            total = 0
            for e in self.m.entries:
                if e.type != "file":
                    continue
                off = 0
                zero = False
                for c in e.chunks:
                    b = bytes.fromhex(c)
                    hit = blobs.get(b)
                    if hit is None:
                        raise CheckpointError(
                            f"checkpoint {self.m.key}: blob {c} of {e.path!r} "
                            "is in none of its packs"
                        )
                    pack, pe = hit
                    zero = _is_zero_blob(pe, self.repo.params.max_size)
                    if not zero:
                        plan.setdefault(pack, {}).setdefault(b, (pe, []))[1].append((e.path, off))
                    off += pe.raw_length
                if e.chunks and zero:
                    self.tail_holes.add(e.path)
                elif len(e.chunks) == 1:
                    # All its data in one blob: created, written and given its metadata
                    # where that blob is decoded, with one open (most files of a tree).
                    self.whole[e.path] = e
                if off != e.size:
                    raise CheckpointError(
                        f"checkpoint {self.m.key}: chunks of {e.path!r} do not add up to its size"
                    )
                total += e.size
            self.progress.total = total

            os.makedirs(self.target, exist_ok=True)
            if os.listdir(self.target):
                raise CheckpointError(f"restore target {self.target} is not empty")
            self.root_fd = os.open(
                self.target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
            dirs = DirFds(self.root_fd)
            try:
                self._create(dirs)
                zero_total = total - sum(
                    pe.raw_length * len(t) for p in plan.values() for pe, t in p.values()
                )
                self.progress.add(zero_total)
                list(pool.map(lambda p: self._fill(p, plan[p]), list(plan)))
                self.progress.finish()
                self._links(dirs)
                # Metadata in this thread: a few cheap syscalls per file, where several
                # threads only fight over the GIL (100k files: 1.3 s on one, 12 s on four).
                for e in self.m.entries:
                    self._check_cancel()
                    if e.type not in ("dir", "hardlink") and e.path not in self.whole:
                        self._meta(dirs, e)
                for e in reversed(self.m.entries):
                    if e.type == "dir":
                        self._meta(dirs, e)
            finally:
                dirs.close()
                os.close(self.root_fd)
        return RestoreResult(
            files=sum(1 for e in self.m.entries if e.type == "file"),
            bytes=total,
            seconds=time.monotonic() - t0,
            warnings=self.warnings,
        )

    def _create(self, dirs: DirFds) -> None:
        for e in self.m.entries[1:]:
            self._check_cancel()
            if e.type == "hardlink" or e.path in self.whole:
                continue
            parent, name = posixpath.split(e.path)
            pfd = dirs.get(parent)
            try:
                if e.type == "dir":
                    os.mkdir(name, 0o700, dir_fd=pfd)
                elif e.type == "file":
                    fd = os.open(
                        name,
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o600,
                        dir_fd=pfd,
                    )
                    try:
                        # Holes stay holes: zero chunks are never written, so a file that
                        # ends in one needs its size set (ftruncate costs ~0.3 ms on ext4:
                        # only where needed).
                        if e.path in self.tail_holes:
                            os.ftruncate(fd, e.size)
                    finally:
                        os.close(fd)
                elif e.type == "symlink":
                    os.symlink(e.target, name, dir_fd=pfd)
                elif e.type == "fifo":
                    os.mkfifo(name, 0o600, dir_fd=pfd)
                elif e.type == "whiteout":
                    os.mknod(name, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=pfd)
                else:  # validate() let nothing else through
                    raise UnsafeArchive(f"unexpected entry type {e.type!r}")
            finally:
                os.close(pfd)

    def _fill(
        self, pack: str, wanted: dict[bytes, tuple[PackEntry, list[tuple[str, int]]]]
    ) -> None:
        for group in _ranges([pe for pe, _ in wanted.values()]):
            self._check_cancel()
            start = group[0].offset
            length = group[-1].offset + group[-1].length - start
            data = memoryview(_load_range(self.repo, pack, start, length))
            for pe in group:
                raw = _decode_blob(
                    pack, pe, data[pe.offset - start : pe.offset - start + pe.length]
                )
                for path, off in wanted[pe.blob][1]:
                    whole = self.whole.get(path)
                    if whole is None:
                        fd = safe_open(self.root_fd, path, os.O_WRONLY)
                    else:
                        # O_EXCL (and safe_open's no-symlink resolution): never into
                        # anything that was there before.
                        fd = safe_open(self.root_fd, path, _CREATE_FLAGS, 0o600)
                    try:
                        view = memoryview(raw)
                        while view:
                            n = os.pwrite(fd, view, off)
                            view, off = view[n:], off + n
                        if whole is not None:
                            self._meta_fd(fd, whole)
                    finally:
                        os.close(fd)
                    self.progress.add(len(raw))

    def _links(self, dirs: DirFds) -> None:
        for e in self.m.entries:
            if e.type != "hardlink":
                continue
            sp, sn = posixpath.split(e.target)
            dp, dn = posixpath.split(e.path)
            sfd, dfd = dirs.get(sp), dirs.get(dp)
            try:
                os.link(sn, dn, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            finally:
                os.close(sfd)
                os.close(dfd)

    def _meta_fd(self, fd: int, e: Entry) -> None:
        if _IS_ROOT:
            os.fchown(fd, e.uid, e.gid)
        _set_xattrs(fd, e.xattrs, self.warnings, e.path)
        # After chown, which clears set-id bits.
        os.fchmod(fd, e.mode)
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))

    def _meta(self, dirs: DirFds, e: Entry) -> None:
        if e.type in ("file", "dir"):
            flags = os.O_RDONLY | (os.O_DIRECTORY if e.type == "dir" else 0)
            fd = safe_open(self.root_fd, e.path, flags)
            try:
                self._meta_fd(fd, e)
            finally:
                os.close(fd)
            return
        parent, name = posixpath.split(e.path)
        pfd = dirs.get(parent)
        try:
            if e.type == "symlink":
                if _IS_ROOT:
                    os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
                _set_xattrs(f"/proc/self/fd/{pfd}/{name}", e.xattrs, self.warnings, e.path)
                os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)
                return
            # fifo, whiteout: an O_PATH fd names the inode itself without opening it.
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                st = os.fstat(fd)
                if stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode):
                    raise UnsafeArchive(f"{e.path!r} changed type during restore")
                p = f"/proc/self/fd/{fd}"
                if _IS_ROOT:
                    os.chown(p, e.uid, e.gid)
                _set_xattrs(p, e.xattrs, self.warnings, e.path)
                os.chmod(p, e.mode)
                os.utime(p, ns=(e.mtime_ns, e.mtime_ns))
            finally:
                os.close(fd)
        finally:
            os.close(pfd)


def restore_sync(
    uri: str,
    target_dir: Path | str,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    threads: int | None = None,
    cancel: threading.Event | None = None,
) -> RestoreResult:
    """Restore into an empty directory; on error the directory holds partial data.

    `cancel` set (from any thread) ends the restore with RestoreCancelled soon after."""
    base, _, _ = split_checkpoint_uri(uri)
    m = _load_manifest_uri(uri, storage_options)
    repo = get_repository(base, storage_options, create=False)
    n = threads or min(8, (os.cpu_count() or 2) * 2)
    try:
        return _Restore(repo, m, str(target_dir), progress, n, cancel).run()
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"restore of {uri} into {target_dir} failed: {e}") from e


# ---------------------------------------------------------------------------------------
# Verify


@dataclass(frozen=True)
class VerifyReport:
    uri: str
    ok: bool
    problems: list[str]
    bad_packs: list[str]
    packs_checked: int
    bytes_checked: int


def verify_sync(
    uri: str,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    threads: int | None = None,
) -> VerifyReport:
    """Download and re-hash every pack and blob the checkpoint needs."""
    base, _, _ = split_checkpoint_uri(uri)
    try:
        m = _load_manifest_uri(uri, storage_options)
        validate(m)
    except (CheckpointError, ValueError) as e:
        return VerifyReport(uri, False, [str(e)], [], 0, 0)
    repo = get_repository(base, storage_options, create=False)
    needed = {bytes.fromhex(c) for e in m.entries if e.type == "file" for c in e.chunks}
    found: set[bytes] = set()
    problems: list[str] = []
    bad: list[str] = []
    lock = threading.Lock()
    prog = _Progress(progress)
    checked = 0

    def check(pack: str) -> None:
        nonlocal checked
        try:
            try:
                data = repo.backend.load(pack_name(pack))
            except FileNotFoundError:
                raise CorruptPack(pack, f"missing from {repo.base_uri}") from None
            if pack_id(data) != pack:
                raise CorruptPack(pack, "content does not hash to its name (corrupt or truncated)")
            entries = parse_pack_table(pack, data, len(data))
            mv = memoryview(data)
            for e in entries:
                _decode_blob(pack, e, mv[e.offset : e.offset + e.length])
            with lock:
                found.update(e.blob for e in entries)
                checked += len(data)
        except CorruptPack as err:
            with lock:
                problems.append(str(err))
                bad.append(pack)
        prog.add(1)

    prog.total = len(m.packs)
    n = threads or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(n, "ckpt-verify") as pool:
        list(pool.map(check, m.packs))
    prog.finish()
    missing = needed - found
    if missing and not bad:
        problems.append(f"{len(missing)} blobs are in none of the checkpoint's packs")
    return VerifyReport(uri, not problems, problems, sorted(bad), len(m.packs), checked)


# ---------------------------------------------------------------------------------------
# Listing and the async API


def list_checkpoints(
    base_uri: str, session_id: str | None = None, *, storage_options: dict[str, Any] | None = None
) -> list[CheckpointInfo]:
    """Complete checkpoints (those with a manifest), oldest first; blocking."""
    return get_repository(base_uri, storage_options).list_checkpoints(session_id)


def latest_checkpoint(
    base_uri: str, session_id: str, *, storage_options: dict[str, Any] | None = None
) -> str | None:
    cps = list_checkpoints(base_uri, session_id, storage_options=storage_options)
    return cps[-1].uri if cps else None


def _threadsafe(progress: ProgressFn | None) -> ProgressFn | None:
    """Deliver progress on the caller's event loop, so callbacks can touch asyncio state."""
    if progress is None:
        return None
    loop = asyncio.get_running_loop()

    def fn(done: int, total: int) -> None:
        loop.call_soon_threadsafe(progress, done, total)

    return fn


async def backup(
    base_uri: str,
    session_id: str,
    source_dir: Path | str,
    parent: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    threads: int | None = None,
) -> BackupResult:
    """Write `source_dir` as a new checkpoint of `session_id`; `parent` makes it incremental."""
    return await asyncio.to_thread(
        backup_sync,
        base_uri,
        session_id,
        source_dir,
        parent,
        storage_options=storage_options,
        progress=_threadsafe(progress),
        threads=threads,
    )


async def restore(
    uri: str,
    target_dir: Path | str,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    threads: int | None = None,
    cancel: threading.Event | None = None,
) -> RestoreResult:
    return await asyncio.to_thread(
        restore_sync,
        uri,
        target_dir,
        storage_options=storage_options,
        progress=_threadsafe(progress),
        threads=threads,
        cancel=cancel,
    )


async def verify(
    uri: str,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    threads: int | None = None,
) -> VerifyReport:
    return await asyncio.to_thread(
        verify_sync,
        uri,
        storage_options=storage_options,
        progress=_threadsafe(progress),
        threads=threads,
    )
