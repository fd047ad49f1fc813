"""Host facts: capacity for Hello/HostCapacity, and what `doctor` checks."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any

import psutil

from agent.datalinks.mounter import backend_named, backends, fuse_usable
from agent.volumes.directory import DirectoryVolume
from agent.volumes.xfs import XfsLoopVolume

__all__ = ["doctor_report", "host_capacity"]


def host_capacity(state_dir: Path, disk_budget_free_bytes: int) -> dict[str, int]:
    mem = psutil.virtual_memory()
    try:
        disk_free = shutil.disk_usage(state_dir).free
    except OSError:
        disk_free = 0
    # Volumes are sparse files (or directories) in the state directory: the budget
    # left can never be more than the disk there actually has free.
    budget = min(max(0, disk_budget_free_bytes), int(disk_free))
    # CPUs this process may use (cgroup/affinity), not only what the host has.
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = psutil.cpu_count() or 1
    return {
        "cpus": cpus,
        "memory_bytes": int(mem.total),
        "memory_available_bytes": int(mem.available),
        "disk_free_bytes": int(disk_free),
        "disk_budget_free_bytes": int(budget),
    }


def _podman_socket_answers(socket_path: Path) -> tuple[bool, str]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(3)
            sock.connect(str(socket_path))
            sock.sendall(b"GET /v4.0.0/libpod/_ping HTTP/1.0\r\nHost: podman\r\n\r\n")
            answer = sock.recv(64)
    except OSError as exc:
        return False, f"podman socket {socket_path}: {exc.strerror or exc}"
    if b" 200 " not in answer.split(b"\r\n", 1)[0]:
        return False, f"podman socket {socket_path}: unexpected answer {answer[:40]!r}"
    return True, f"podman answers on {socket_path}"


def _podman_check(socket_path: Path | None) -> tuple[bool, str]:
    binary = shutil.which("podman")
    socket_path = socket_path or Path("/run/podman/podman.sock")
    reasons = [f"podman binary: {binary or 'not found'}"]
    ok, why = _podman_socket_answers(socket_path)
    reasons.append(why if ok else f"{why} (start `podman system service`, scripts/podman-setup)")
    if os.geteuid() != 0:
        ok = False
        reasons.append("not root: the agent mounts each session's overlay root file system")
    return ok, "; ".join(reasons)


def doctor_report(
    runtime_in_use: str | None = None,
    volume_in_use: str | None = None,
    podman_socket: Path | None = None,
) -> dict[str, Any]:
    """Which runtimes and volume kinds are usable here, and why."""
    podman_ok, podman_why = _podman_check(podman_socket)
    dir_ok, dir_why = DirectoryVolume.available()
    fuse_ok, fuse_why = fuse_usable()
    chosen = backend_named("auto")
    mounters = []
    for name, backend in backends().items():
        ok, why = backend.available()
        in_use = chosen is not None and chosen.name == name
        mounters.append({"name": name, "usable": ok and fuse_ok, "reason": why, "inUse": in_use})
    xfs_ok, xfs_why = XfsLoopVolume.available()
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
        # Data-link mounts: FUSE on this host, and the mount tools (first usable = used).
        "dataLinks": {"fuseUsable": fuse_ok, "reason": fuse_why, "mounters": mounters},
        "volumeKinds": [
            {
                "name": "xfs-loop",
                "usable": xfs_ok,
                "reason": xfs_why + ("; chosen by --volume-kind auto" if xfs_ok else ""),
                "inUse": volume_in_use == "xfs-loop",
            },
            {
                "name": "directory",
                "usable": dir_ok,
                "reason": dir_why + ("" if xfs_ok else "; chosen by --volume-kind auto"),
                "inUse": volume_in_use == "directory",
            },
        ],
    }
