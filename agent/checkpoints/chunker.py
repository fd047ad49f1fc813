"""Content-defined chunking of file contents.

pyfastcdc (FastCDC 2020, Cython) cuts at > 2 GB/s on one core here, so chunking is never
the bottleneck; cut points depend on content, so an insertion only changes nearby chunks.
Sizes follow restic's order of magnitude (about 1 MiB on average): large enough that the
per-chunk costs (a hash id in the manifest, an index entry, a zstd frame) stay small,
small enough that a change in a large file re-uploads about a megabyte.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import pyfastcdc

__all__ = ["DEFAULT_PARAMS", "Chunker", "ChunkerParams"]


@dataclass(frozen=True)
class ChunkerParams:
    min_size: int = 256 * 1024
    avg_size: int = 1024 * 1024
    max_size: int = 4 * 1024 * 1024

    def to_json(self) -> dict[str, int]:
        return {"min": self.min_size, "avg": self.avg_size, "max": self.max_size}

    @classmethod
    def from_json(cls, d: dict[str, int]) -> ChunkerParams:
        return cls(int(d["min"]), int(d["avg"]), int(d["max"]))


DEFAULT_PARAMS = ChunkerParams()


class Chunker:
    """One per thread: the underlying FastCDC object is not safe to share."""

    def __init__(self, params: ChunkerParams = DEFAULT_PARAMS):
        self.params = params
        self._cdc = pyfastcdc.FastCDC(
            params.avg_size, min_size=params.min_size, max_size=params.max_size
        )

    def cut_buf(self, buf: bytes | memoryview) -> Iterator[memoryview]:
        if len(buf) <= self.params.min_size:
            # Below the minimum there is exactly one chunk; skip the scan.
            yield memoryview(buf)
            return
        for c in self._cdc.cut_buf(buf):
            yield c.data

    def cut_stream(self, f: BinaryIO) -> Iterator[memoryview]:
        """Chunks of a stream; each view is valid only until the next one is produced."""
        for c in self._cdc.cut_stream(f):
            yield c.data
