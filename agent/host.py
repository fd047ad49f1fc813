"""Host facts: capacity for Hello/HostCapacity, and what `doctor` checks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import psutil

from agent.volume_directory import DirectoryVolume

__all__ = ["doctor_report", "host_capacity"]


def host_capacity(state_dir: Path, disk_budget_free_bytes: int) -> dict[str, int]:
    mem = psutil.virtual_memory()
    try:
        disk_free = shutil.disk_usage(state_dir).free
    except OSError:
        disk_free = 0
    return {
        "cpus": psutil.cpu_count() or 1,
        "memory_bytes": int(mem.total),
        "memory_available_bytes": int(mem.available),
        "disk_free_bytes": int(disk_free),
        "disk_budget_free_bytes": int(max(0, disk_budget_free_bytes)),
    }


def _podman_check() -> tuple[bool, str]:
    binary = shutil.which("podman")
    uid = os.getuid()
    sockets = [Path("/run/podman/podman.sock"), Path(f"/run/user/{uid}/podman/podman.sock")]
    found = [str(s) for s in sockets if s.exists()]
    reasons = [f"podman binary: {binary or 'not found'}"]
    reasons.append(f"podman socket: {', '.join(found) if found else 'not found'}")
    reasons.append("the podman backend is not part of this build")
    return False, "; ".join(reasons)


def _xfs_loop_check() -> tuple[bool, str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("not root")
    for tool in ("losetup", "mkfs.xfs", "xfs_growfs"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} not found")
    if not Path("/dev/loop-control").exists():
        missing.append("/dev/loop-control missing")
    host_ok = not missing
    parts = ["host prerequisites present" if host_ok else "; ".join(missing)]
    parts.append("xfs-loop volumes are not implemented yet (report only)")
    return False, "; ".join(parts)


def doctor_report(runtime_in_use: str | None = None) -> dict[str, Any]:
    """Which runtimes and volume kinds are usable here, and why."""
    podman_ok, podman_why = _podman_check()
    dir_ok, dir_why = DirectoryVolume.available()
    xfs_ok, xfs_why = _xfs_loop_check()
    return {
        "runtimes": [
            {
                "name": "local",
                "usable": True,
                "reason": "tools run as plain processes in the session directory (no isolation)",
                "inUse": runtime_in_use == "local",
            },
            {
                "name": "podman",
                "usable": podman_ok,
                "reason": podman_why,
                "inUse": runtime_in_use == "podman",
            },
        ],
        "volumeKinds": [
            {"name": "directory", "usable": dir_ok, "reason": dir_why, "inUse": True},
            {"name": "xfs-loop", "usable": xfs_ok, "reason": xfs_why, "inUse": False},
        ],
    }
