"""Data-links: cloud buckets FUSE-mounted into sessions under /workspace/data."""

from agent.datalinks.mounter import (
    DATA_DIR,
    STATE_FAILED,
    DataLinkError,
    DataLinkMounter,
    MountStatus,
    backend_named,
    data_links_json,
)

__all__ = [
    "DATA_DIR",
    "STATE_FAILED",
    "DataLinkError",
    "DataLinkMounter",
    "MountStatus",
    "backend_named",
    "data_links_json",
]
