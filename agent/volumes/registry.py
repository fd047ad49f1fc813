"""Volume kinds by name: a plain table, so the interface and the kinds import no circle."""

from __future__ import annotations

from agent.errors import VolumeError
from agent.volumes.base import VolumeKind
from agent.volumes.directory import DirectoryVolume
from agent.volumes.xfs import XfsLoopVolume

__all__ = ["create_volume_kind", "volume_kinds"]


def volume_kinds() -> dict[str, type[VolumeKind]]:
    return {"directory": DirectoryVolume, "xfs-loop": XfsLoopVolume}


def create_volume_kind(name: str) -> VolumeKind:
    """`auto` = xfs-loop where it works here (root, losetup, mkfs.xfs), else directory."""
    kinds = volume_kinds()
    if name == "auto":
        ok, _ = kinds["xfs-loop"].available()
        return kinds["xfs-loop" if ok else "directory"]()
    try:
        cls = kinds[name]
    except KeyError:
        known = ", ".join(kinds)
        raise VolumeError(f"unknown volume kind {name!r} (known: auto, {known})") from None
    ok, why = cls.available()
    if not ok:
        raise VolumeError(f"volume kind {name} is not usable here: {why}")
    return cls()
