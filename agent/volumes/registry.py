"""Volume kinds by name: a plain table, so the interface and the kinds import no circle."""

from __future__ import annotations

from agent.errors import VolumeError
from agent.volumes.base import VolumeKind
from agent.volumes.directory import DirectoryVolume
from agent.volumes.xfs import XfsLoopVolume

__all__ = ["auto_volume_kind", "create_volume_kind", "volume_kinds"]


def volume_kinds() -> dict[str, type[VolumeKind]]:
    """Every kind, in the order `auto` prefers them."""
    return {"xfs-loop": XfsLoopVolume, "directory": DirectoryVolume}


def auto_volume_kind() -> str:
    """What `--volume-kind auto` picks: the first kind usable here (a directory always is)."""
    return next((n for n, k in volume_kinds().items() if k.available()[0]), "directory")


def create_volume_kind(name: str) -> VolumeKind:
    """`auto` = xfs-loop where it works here (root, losetup, mkfs.xfs), else directory."""
    kinds = volume_kinds()
    if name == "auto":
        return kinds[auto_volume_kind()]()
    try:
        cls = kinds[name]
    except KeyError:
        known = ", ".join(kinds)
        raise VolumeError(f"unknown volume kind {name!r} (known: auto, {known})") from None
    ok, why = cls.available()
    if not ok:
        raise VolumeError(f"volume kind {name} is not usable here: {why}")
    return cls()
