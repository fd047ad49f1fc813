"""The session volume interface: one kind per way of giving a session its disk.

`directory` (a plain directory with accounting) is built; `xfs-loop` (sparse file,
loop device, XFS, online growth) slots in behind the same four operations.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["GIB", "VolumeInfo", "VolumeKind"]

GIB = 1024**3


@dataclass
class VolumeInfo:
    kind: str
    path: str
    size_bytes: int
    used_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VolumeInfo:
        return cls(
            kind=str(data["kind"]),
            path=str(data["path"]),
            size_bytes=int(data.get("size_bytes", 0)),
            used_bytes=int(data.get("used_bytes", 0)),
        )


class VolumeKind(abc.ABC):
    kind: str
    # How often a per-session watcher should check free space; None = only the
    # agent's periodic accounting tick (nothing to race against).
    poll_seconds: float | None = None

    def free_bytes(self, info: VolumeInfo) -> int | None:
        """Free bytes right now, cheaply (for the fast watcher); None when unknown."""
        return None

    @abc.abstractmethod
    async def prepare(self, path: Path, size_bytes: int) -> VolumeInfo:
        """Create a fresh volume at `path` (for a start; recovery uses `attach`)."""

    @abc.abstractmethod
    async def attach(self, info: VolumeInfo) -> VolumeInfo:
        """Re-attach an existing volume after an agent or host restart; never creates one.

        Raises VolumeGone when its data is not there any more."""

    @abc.abstractmethod
    def is_attached(self, info: VolumeInfo) -> bool:
        """Whether the volume's data is in place at `info.path` (checkpoints read only then)."""

    @abc.abstractmethod
    async def grow(self, info: VolumeInfo, by_bytes: int) -> VolumeInfo:
        """Grow a live volume by `by_bytes`."""

    @abc.abstractmethod
    async def usage(self, info: VolumeInfo) -> VolumeInfo:
        """Refresh `used_bytes`."""

    @abc.abstractmethod
    async def release(self, info: VolumeInfo) -> None:
        """Delete the volume and its data; idempotent."""

    async def sweep(self, under: Path, live: set[str]) -> list[str]:
        """Release what crashed agents left below `under` that is not a `live` volume
        path and that no handle can reach any more (e.g. loop devices of deleted files);
        a description of each thing released."""
        return []

    @classmethod
    @abc.abstractmethod
    def available(cls) -> tuple[bool, str]:
        """Whether this kind can be used on this host, and why (for `doctor`)."""
