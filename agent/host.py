"""Host facts: capacity for Hello/HostCapacity, and what `doctor` checks."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import psutil

from agent.datalinks.mounter import backend_named, backends, fuse_usable
from agent.runtime import RuntimeOptions, runtime_class, runtime_names
from agent.runtime.local import tools_run_as
from agent.volumes import auto_volume_kind, volume_kinds

__all__ = ["doctor_report", "host_capacity", "local_tools"]


def local_tools(options: RuntimeOptions) -> dict[str, Any]:
    """Who runs the `local` runtime's tools here: `separate` when each session has a
    user of its own; `reason` in words (also the local runtime's `doctor` reason)."""
    separate = os.geteuid() == 0 and options.local_tool_user == "session"
    return {
        "toolUser": options.local_tool_user,
        "separate": separate,
        "reason": tools_run_as(options),
    }


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


def doctor_report(
    runtime_in_use: str | None = None,
    volume_in_use: str | None = None,
    podman_socket: Path | None = None,
    local_tool_user: str = "session",
    podman_network: str = "bridge",
) -> dict[str, Any]:
    """Which runtimes and volume kinds are usable here, and why: each registered one
    is asked (`available`). `localTools` says who runs the `local` runtime's tools."""
    options = RuntimeOptions(local_tool_user=local_tool_user, podman_network=podman_network)
    if podman_socket is not None:
        options = dataclasses.replace(options, podman_socket=podman_socket)
    runtimes = []
    for name in runtime_names():
        ok, why = runtime_class(name).available(options)
        runtimes.append(
            {"name": name, "usable": ok, "reason": why, "inUse": runtime_in_use == name}
        )
    auto = auto_volume_kind()
    volume_kinds_out = []
    for name, kind in volume_kinds().items():
        ok, why = kind.available()
        volume_kinds_out.append(
            {
                "name": name,
                "usable": ok,
                "reason": why + ("; chosen by --volume-kind auto" if name == auto else ""),
                "inUse": volume_in_use == name,
            }
        )
    fuse_ok, fuse_why = fuse_usable()
    chosen = backend_named("auto")
    mounters = []
    for name, backend in backends().items():
        ok, why = backend.available()
        in_use = chosen is not None and chosen.name == name
        mounters.append({"name": name, "usable": ok and fuse_ok, "reason": why, "inUse": in_use})
    return {
        "runtimes": runtimes,
        "localTools": local_tools(options),
        # Data-link mounts: FUSE on this host, and the mount tools (first usable = used).
        "dataLinks": {"fuseUsable": fuse_ok, "reason": fuse_why, "mounters": mounters},
        "volumeKinds": volume_kinds_out,
    }
