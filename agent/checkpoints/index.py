"""Index files: which pack holds each blob, so a backup can skip blobs already stored.

An index is written after the packs it describes and is named by the hash of its
content, so it is never rewritten in place (GC writes a smaller one, then removes the
old). Restore and verify do not need indexes: a manifest names its packs and every pack
carries its own table. Indexes only make deduplication cheap across checkpoints, clones
and studios that share a repository.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import zstandard

from agent.checkpoints.pack import PackEntry, pack_id

__all__ = ["IndexEntry", "decode_index", "encode_index"]

MAGIC = b"STIDX001"
# blob id, pack id (binary), kind, compressed?, offset, stored length, raw length.
RECORD = struct.Struct("<32s32sBBQII")


@dataclass(frozen=True, slots=True)
class IndexEntry:
    pack: str
    kind: int
    compressed: bool
    offset: int
    length: int
    raw_length: int


def encode_index(packs: dict[str, list[PackEntry]]) -> tuple[str, bytes]:
    """(index id, bytes) describing every blob of the given packs."""
    rows = [MAGIC]
    for pack, entries in sorted(packs.items()):
        pb = bytes.fromhex(pack)
        for e in entries:
            rows.append(
                RECORD.pack(e.blob, pb, e.kind, int(e.compressed), e.offset, e.length, e.raw_length)
            )
    data = zstandard.ZstdCompressor(level=3).compress(b"".join(rows))
    return pack_id(data), data


def decode_index(data: bytes) -> dict[bytes, IndexEntry]:
    raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 31)
    if raw[: len(MAGIC)] != MAGIC:
        raise ValueError("not a checkpoint index")
    out: dict[bytes, IndexEntry] = {}
    packs: dict[bytes, str] = {}
    for blob, pb, kind, comp, off, ln, rl in RECORD.iter_unpack(raw[len(MAGIC) :]):
        pack = packs.get(pb)
        if pack is None:
            pack = packs[pb] = pb.hex()
        out[blob] = IndexEntry(pack, kind, bool(comp), off, ln, rl)
    return out
