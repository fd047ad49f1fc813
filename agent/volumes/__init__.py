"""Session volumes: the interface, the registry by name, and the `directory` and
`xfs-loop` kinds."""

from agent.volumes.base import GIB, VolumeInfo, VolumeKind
from agent.volumes.registry import auto_volume_kind, create_volume_kind, volume_kinds

__all__ = [
    "GIB",
    "VolumeInfo",
    "VolumeKind",
    "auto_volume_kind",
    "create_volume_kind",
    "volume_kinds",
]
