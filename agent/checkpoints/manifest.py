"""The checkpoint manifest: the tree of the overlay upper directory and the packs it needs.

JSON (the C encoder handles 100,000 entries in a fraction of a second) compressed with
zstd. The manifest is the last object a backup writes: a checkpoint exists iff its
manifest does. `validate` is the restore's first line of defence: every path, type and
link in a manifest is checked before a single byte is written.
"""

from __future__ import annotations

import base64
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import zstandard

from agent.errors import UnsafeArchive

# json's own string encoder (its C one where built): the text a key or value gets in
# json.dumps(..., ensure_ascii=False).
_json_str = json.encoder.encode_basestring
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

__all__ = [
    "ENTRY_TYPES",
    "Entry",
    "Manifest",
    "decode_manifest",
    "encode_manifest",
    "validate",
    "validate_packs",
]

VERSION = 1
# Char devices are only ever overlay whiteouts (0:0); no other device type exists here.
ENTRY_TYPES = frozenset({"dir", "file", "symlink", "hardlink", "fifo", "whiteout"})
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


@dataclass(slots=True)
class Entry:
    path: str
    type: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    size: int = 0
    ino: int = 0
    # Blob ids (hex) of the file's chunks in order; the lengths come from the pack tables.
    # A tuple, not a list: a tuple of strs leaves the cyclic GC's lists at its first
    # young collection, where a list stays in them. A full checkpoint of a venv moved
    # 41,000 objects into the oldest generation, 19,000 of them these lists (a default
    # empty one per entry, then the file's), and the agent pays for a full collection,
    # which walks every object it holds, each time that generation grows by a quarter.
    chunks: tuple[str, ...] = ()
    # Symlink target, or for a hard link the path of the entry it shares an inode with.
    target: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    # The file kept changing while it was read: its content may mix old and new writes.
    inconsistent: bool = False
    # This entry's JSON text, kept by encode_manifest: an entry is never changed once it
    # is in a written manifest, and the next backup reuses unchanged entries as they are.
    encoded: str | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"p": self.path, "t": self.type, "m": self.mode}
        if self.uid:
            d["u"] = self.uid
        if self.gid:
            d["g"] = self.gid
        d["mt"] = self.mtime_ns
        if self.ctime_ns:
            d["ct"] = self.ctime_ns
        if self.size:
            d["s"] = self.size
        if self.ino:
            d["i"] = self.ino
        if self.chunks:
            d["c"] = self.chunks
        if self.target:
            d["l"] = self.target
        if self.xattrs:
            d["x"] = {k: base64.b64encode(v).decode() for k, v in self.xattrs.items()}
        if self.inconsistent:
            d["bad"] = True
        return d

    def to_json_text(self) -> str:
        """`to_json()` as compact JSON text: the same text as json.dumps of it with
        separators (",", ":") and ensure_ascii=False, written directly for the common
        entry (int fields, no xattrs). A full checkpoint encodes one per file in its
        serial tail, with one core idle: a venv's 10,056 entries took 21-43 ms this way
        against 59-74 ms for json.dumps of each, of a 1.2-1.4 s checkpoint."""
        plain = (
            int
            is type(self.mode)
            is type(self.uid)
            is type(self.gid)
            is type(self.mtime_ns)
            is type(self.ctime_ns)
            is type(self.size)
            is type(self.ino)
        )
        if self.xattrs or not plain:
            # xattrs' base64, and a field that is not a plain int (a bool is an int
            # subclass that JSON spells differently), take json's own path.
            return _dumps(self.to_json())
        try:
            text = f'{{"p":{_json_str(self.path)},"t":{_json_str(self.type)},"m":{self.mode}'
            if self.uid:
                text += f',"u":{self.uid}'
            if self.gid:
                text += f',"g":{self.gid}'
            text += f',"mt":{self.mtime_ns}'
            if self.ctime_ns:
                text += f',"ct":{self.ctime_ns}'
            if self.size:
                text += f',"s":{self.size}'
            if self.ino:
                text += f',"i":{self.ino}'
            if self.chunks:
                text += f',"c":[{",".join(map(_json_str, self.chunks))}]'
            if self.target:
                text += f',"l":{_json_str(self.target)}'
            if self.inconsistent:
                text += ',"bad":true'
            return text + "}"
        except TypeError:
            # A name or chunk id that is not a str (only a manifest edited by hand, read
            # back as a parent): json's own text for it, as before.
            return _dumps(self.to_json())

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Entry:
        x = d.get("x") or {}
        if not isinstance(x, dict):
            raise UnsafeArchive(f"bad xattrs in checkpoint entry {d.get('p')!r}")
        return cls(
            path=d["p"],
            type=d["t"],
            mode=d.get("m", 0o644),
            uid=d.get("u", 0),
            gid=d.get("g", 0),
            mtime_ns=d.get("mt", 0),
            ctime_ns=d.get("ct", 0),
            size=d.get("s", 0),
            ino=d.get("i", 0),
            chunks=tuple(d.get("c") or ()),
            target=d.get("l", ""),
            xattrs={k: base64.b64decode(v) for k, v in x.items()},
            inconsistent=bool(d.get("bad", False)),
        )


@dataclass
class Manifest:
    session_id: str
    key: str
    created_ns: int
    parent: str | None
    entries: list[Entry]
    # Every pack holding a blob of this checkpoint: what restore reads and GC keeps.
    packs: list[str]
    chunker: dict[str, int]
    stats: dict[str, Any] = field(default_factory=dict)


def encode_manifest(m: Manifest) -> bytes:
    doc = {
        "version": VERSION,
        "session": m.session_id,
        "key": m.key,
        "created_ns": m.created_ns,
        "parent": m.parent,
        "chunker": m.chunker,
        "stats": m.stats,
        "packs": m.packs,
    }
    parts = []
    for e in m.entries:
        text = e.encoded
        if text is None:
            text = e.encoded = e.to_json_text()
        parts.append(text)
    # The same document as one json.dumps of it all, with the entries' texts reused.
    head = _dumps(doc)
    # A name that is not UTF-8 (a zip from Windows, a latin-1 tarball) is a str with lone
    # surrogates (os.fsdecode's surrogateescape), which UTF-8 cannot encode. They occur
    # only inside JSON strings, where backslashreplace writes each as its JSON escape
    # (\udce9): json.loads gives the same surrogate back, and os gives the same bytes.
    raw = f'{head[:-1]},"entries":[{",".join(parts)}]}}'.encode("utf-8", "backslashreplace")
    # Level 1: the entries are mostly hex ids, where higher levels gain almost nothing
    # (10,000 entries: 5 ms at level 1, 32 ms at 6, for 0.56 vs 0.59 MB).
    return zstandard.ZstdCompressor(level=1).compress(raw)


def decode_manifest(data: bytes) -> Manifest:
    raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 31)
    doc = json.loads(raw)
    if doc.get("version") != VERSION:
        raise UnsafeArchive(f"unknown checkpoint manifest version {doc.get('version')!r}")
    try:
        entries = [Entry.from_json(e) for e in doc["entries"]]
    except (KeyError, TypeError, ValueError) as e:
        raise UnsafeArchive(f"malformed checkpoint manifest: {e}") from e
    return Manifest(
        session_id=doc["session"],
        key=doc["key"],
        created_ns=doc["created_ns"],
        parent=doc.get("parent"),
        entries=entries,
        packs=list(doc["packs"]),
        chunker=doc.get("chunker") or {},
        stats=doc.get("stats") or {},
    )


def _check_name(path: str) -> None:
    if not isinstance(path, str) or not path:
        raise UnsafeArchive(f"empty or non-text path in checkpoint: {path!r}")
    # A newline is a legal name byte (saved and restored like any other); NUL cannot be
    # in a name on Linux, so only a forged manifest has one.
    if "\0" in path:
        raise UnsafeArchive(f"NUL in checkpoint path: {path!r}")
    if path.startswith("/"):
        raise UnsafeArchive(f"absolute path in checkpoint: {path!r}")
    parts = path.split("/")
    if "" in parts or "." in parts or ".." in parts:
        raise UnsafeArchive(f"path with '..', '.' or an empty component in checkpoint: {path!r}")


def validate_packs(m: Manifest) -> None:
    """The pack ids alone (they become object names): restore fetches the pack tables
    while `validate` checks the entries."""
    for p in m.packs:
        if not isinstance(p, str) or not _HEX64.match(p):
            raise UnsafeArchive(f"bad pack id in checkpoint: {p!r}")


def _check_numbers(e: Entry) -> None:
    for k in ("mode", "uid", "gid", "mtime_ns", "size"):
        v = getattr(e, k)
        if not isinstance(v, int) or v < 0:
            raise UnsafeArchive(f"bad {k} for {e.path!r} in checkpoint")
    if e.mode > 0o7777:
        raise UnsafeArchive(f"bad mode for {e.path!r} in checkpoint")


def validate(m: Manifest) -> None:
    """Refuse anything that could write outside the target; raise UnsafeArchive.

    Written for speed where it costs nothing in strictness (a restore waits for it:
    ~10 us per entry before, 100,000 entries a second): the numbers are checked in one
    expression, the messages come from the slower checks only when it fails."""
    validate_packs(m)
    if not m.entries or m.entries[0].path != "." or m.entries[0].type != "dir":
        raise UnsafeArchive("checkpoint manifest does not start with its root directory")
    dirs = {"."}
    files: set[str] = set()
    seen = {"."}
    hex64 = _HEX64.match
    for e in m.entries[1:]:
        path = e.path
        _check_name(path)
        if path in seen:
            raise UnsafeArchive(f"duplicate path in checkpoint: {path!r}")
        seen.add(path)
        parent = path.rpartition("/")[0] or "."
        # Every parent must be a directory of this manifest created earlier: nothing is
        # ever written through a symlink, so a link cannot lead a write out of the tree.
        if parent not in dirs:
            raise UnsafeArchive(f"parent of {path!r} is not a directory in the checkpoint")
        if e.type not in ENTRY_TYPES:
            raise UnsafeArchive(f"device node or unknown type {e.type!r} in checkpoint: {path!r}")
        mode, uid, gid, mt, size = e.mode, e.uid, e.gid, e.mtime_ns, e.size
        if not (
            isinstance(mode, int)
            and isinstance(uid, int)
            and isinstance(gid, int)
            and isinstance(mt, int)
            and isinstance(size, int)
            and 0 <= mode <= 0o7777
            and min(uid, gid, mt, size) >= 0
        ):
            _check_numbers(e)
        if e.xattrs:
            for name in e.xattrs:
                if not isinstance(name, str) or not name or "\0" in name:
                    raise UnsafeArchive(f"bad xattr name for {path!r} in checkpoint")
        kind = e.type
        if kind == "file":
            files.add(path)
            for c in e.chunks:
                if not isinstance(c, str) or not hex64(c):
                    raise UnsafeArchive(f"bad chunk id for {path!r} in checkpoint")
        elif kind == "dir":
            dirs.add(path)
        elif e.type == "hardlink":
            _check_name(e.target)
            if e.target not in files:
                raise UnsafeArchive(
                    f"hard link {path!r} -> {e.target!r} does not name an earlier file"
                )
        elif e.type == "symlink":
            t = e.target
            if not t or "\0" in t or len(t) > 4095:
                raise UnsafeArchive(f"bad symlink target for {path!r} in checkpoint")
            # Absolute targets are normal in a root file system (/usr/bin/python3) and
            # point inside the container's root; a relative one must not climb above it.
            if not t.startswith("/"):
                resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), t))
                if resolved == ".." or resolved.startswith("../"):
                    raise UnsafeArchive(f"symlink out of the tree in checkpoint: {path!r} -> {t!r}")
