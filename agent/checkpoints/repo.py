"""The repository layout below a base URI, and its shared objects.

    config                          repository version, chunker parameters
    data/<2 hex>/<pack id>          packs (content-addressed, written once)
    index/<index id>                indexes (content-addressed, written after their packs)
    manifests/<session id>/<key>    one per checkpoint, written last
    locks/<id>                      one per running backup, so GC keeps out of its way

Data and indexes are shared by every studio (and clone) of a compute environment.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.checkpoints.backend import Backend, open_backend
from agent.checkpoints.chunker import DEFAULT_PARAMS, ChunkerParams
from agent.checkpoints.index import IndexEntry, decode_index
from agent.checkpoints.manifest import Manifest, decode_manifest
from agent.errors import CheckpointError

__all__ = [
    "MANIFESTS",
    "REPO_VERSION",
    "CheckpointInfo",
    "Repository",
    "manifest_name",
    "new_checkpoint_key",
    "pack_name",
    "split_checkpoint_uri",
]

REPO_VERSION = 1
MANIFESTS = "manifests/"
# Manifests this process wrote last, one per session: the parent of a session's next
# backup is almost always its previous one, and decoding 10,000 entries costs ~0.2 s.
# Bounded by entries (~0.6 KiB each in memory); the newest manifest is always kept.
MANIFEST_CACHE_ENTRIES = 500_000


def manifest_name(session_id: str, key: str) -> str:
    """The object name of a checkpoint's manifest below the base URI."""
    return f"{MANIFESTS}{session_id}/{key}"


def pack_name(pack: str) -> str:
    return f"data/{pack[:2]}/{pack}"


def new_checkpoint_key() -> str:
    # Sorts by time; the random part keeps two agents' keys apart.
    now = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{now}-{secrets.token_hex(4)}"


def split_checkpoint_uri(uri: str) -> tuple[str, str, str]:
    """(base URI, session id, key) of a checkpoint URI `<base>/manifests/<session>/<key>`."""
    base, sep, rest = uri.rpartition("/" + MANIFESTS)
    parts = rest.split("/")
    if not sep or len(parts) != 2 or not all(parts):
        raise CheckpointError(f"not a checkpoint URI: {uri!r}")
    return base, parts[0], parts[1]


@dataclass(frozen=True)
class CheckpointInfo:
    session_id: str
    key: str
    uri: str
    # Bytes of the manifest object itself; the data size is in the manifest's stats.
    manifest_bytes: int
    saved_at: float


class Repository:
    def __init__(self, backend: Backend, base_uri: str, params: ChunkerParams):
        self.backend = backend
        self.base_uri = base_uri.rstrip("/")
        self.params = params
        self._index_cache: dict[str, tuple[dict[bytes, IndexEntry], frozenset[str]]] = {}
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls, base_uri: str, storage_options: dict[str, Any] | None = None, *, create: bool = True
    ) -> Repository:
        """Open (and on first use create) the repository; blocking."""
        backend = open_backend(base_uri, storage_options)
        try:
            cfg = json.loads(backend.load("config"))
        except FileNotFoundError:
            if not create:
                raise CheckpointError(f"no checkpoint repository at {base_uri}") from None
            cfg = {"version": REPO_VERSION, "chunker": DEFAULT_PARAMS.to_json()}
            backend.save("config", json.dumps(cfg).encode())
        if cfg.get("version") != REPO_VERSION:
            raise CheckpointError(
                f"checkpoint repository {base_uri} has version {cfg.get('version')!r}, "
                f"this agent reads {REPO_VERSION}"
            )
        return cls(backend, base_uri, ChunkerParams.from_json(cfg["chunker"]))

    def manifest_name(self, session_id: str, key: str) -> str:
        return manifest_name(session_id, key)

    def checkpoint_uri(self, session_id: str, key: str) -> str:
        return f"{self.base_uri}/{self.manifest_name(session_id, key)}"

    def load_manifest(self, session_id: str, key: str) -> Manifest:
        return decode_manifest(self.backend.load(self.manifest_name(session_id, key)))

    def remember_manifest(self, m: Manifest) -> None:
        """Keep a manifest this process has just written (immutable from then on)."""
        with self._lock:
            self._manifests.pop(m.session_id, None)
            self._manifests[m.session_id] = m
            held = sum(len(c.entries) for c in self._manifests.values())
            while held > MANIFEST_CACHE_ENTRIES and len(self._manifests) > 1:
                held -= len(self._manifests.popitem(last=False)[1].entries)

    def recent_manifest(self, session_id: str, key: str) -> Manifest | None:
        """The manifest `remember_manifest` kept for this checkpoint, if any. Only a
        backup's parent comes from here: a backup re-checks every reused blob against
        the indexes, so a manifest deleted since (GC) cannot make it lose data."""
        with self._lock:
            m = self._manifests.get(session_id)
        return m if m is not None and m.key == key else None

    def list_checkpoints(self, session_id: str | None = None) -> list[CheckpointInfo]:
        prefix = MANIFESTS + (f"{session_id}/" if session_id else "")
        out = []
        for o in self.backend.list(prefix):
            parts = o.name[len(MANIFESTS) :].split("/")
            if len(parts) != 2:
                continue
            out.append(
                CheckpointInfo(parts[0], parts[1], f"{self.base_uri}/{o.name}", o.size, o.mtime)
            )
        return sorted(out, key=lambda c: (c.session_id, c.key))

    def load_indexes(self) -> dict[bytes, IndexEntry]:
        """Every blob the repository's indexes know; immutable index files are cached."""
        return self.load_indexes_and_ids()[0]

    def load_indexes_and_ids(self) -> tuple[dict[bytes, IndexEntry], set[str]]:
        """The indexes' blobs, and their ids as hex text: a manifest names chunks in hex,
        so a backup checks thousands of reused files against this set without converting
        each id (the text of an index's ids is cached with it)."""
        names = [o.name for o in self.backend.list("index/")]
        merged: dict[bytes, IndexEntry] = {}
        ids: list[frozenset[str]] = []
        for name in names:
            with self._lock:
                cached = self._index_cache.get(name)
            if cached is None:
                try:
                    idx = decode_index(self.backend.load(name))
                except FileNotFoundError:
                    # Removed by GC between list and load: its packs are garbage.
                    continue
                cached = (idx, frozenset(b.hex() for b in idx))
                with self._lock:
                    self._index_cache[name] = cached
            merged.update(cached[0])
            ids.append(cached[1])
        with self._lock:
            for stale in set(self._index_cache) - set(names):
                del self._index_cache[stale]
        return merged, set().union(*ids)

    def take_lock(self, session_id: str) -> str:
        name = f"locks/{session_id}-{secrets.token_hex(6)}"
        body = json.dumps({"session": session_id, "time": time.time()}).encode()
        self.backend.save(name, body, overwrite=True)
        return name

    def release_lock(self, name: str) -> None:
        try:
            self.backend.remove(name)
        except Exception:
            # A stale lock only delays GC until it ages out.
            pass
