"""The runtime backend interface (after Nomad's task drivers).

A backend starts a session's tool, waits for it, stops and destroys it, and — the
part a node agent needs beyond JupyterHub's spawner — recovers a handle persisted by
an earlier agent process, so tools keep running across agent restarts.
"""

from __future__ import annotations

import abc
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import RuntimeStartError
from agent.runtime.tool_guard import PROXY_SECRET_ENV
from studios_shared.environment import environment_refusal

__all__ = [
    "SESSION_UIDS",
    "TOOL_USERS",
    "BindMount",
    "ExitStatus",
    "LabelledTool",
    "Runtime",
    "RuntimeHandle",
    "RuntimeOptions",
    "StartSpec",
    "connect_variables",
    "free_tcp_port",
]


@dataclass(frozen=True)
class BindMount:
    """A host directory made visible in the session (data-links, file-system mounts)."""

    source: Path
    # Absolute path inside the session, e.g. /workspace/data/<mount_name>.
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class StartSpec:
    session_id: str
    image: str
    tool: str
    environment: dict[str, str]
    root_dir: Path
    log_path: Path
    port: int
    generation: int = 0
    # Limits from the studio configuration; 0 = none.
    cpu: int = 0
    memory_mib: int = 0
    gpu: int = 0
    # Bind mounts into the session; never part of a checkpoint.
    mounts: tuple[BindMount, ...] = ()
    # What the proxy proves itself to the tool with ($CONNECT_PROXY_SECRET, see
    # agent/runtime/tool_guard.py); "" gives the tool none. Kept out of the repr, so a
    # spec in a log or a traceback does not show it.
    proxy_secret: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        # The studio's `configuration.environment`, checked by the controller already;
        # checked again here whatever the database says, so no runtime ever starts a
        # tool with a loader or interpreter hook or over one of the agent's own names.
        refusal = environment_refusal(self.environment)
        if refusal:
            raise RuntimeStartError(f"cannot start the tool: {refusal}")


@dataclass
class RuntimeHandle:
    """Everything needed to find the tool again; persisted in the session handle."""

    session_id: str
    pid: int
    create_time: float
    port: int
    root_dir: str
    log_path: str
    # Opaque backend data (container id, ...).
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExitStatus:
    # None when the tool was not our child and its status could not be read.
    exit_code: int | None
    message: str


@dataclass(frozen=True)
class LabelledTool:
    """A tool found on the host by the labels this agent gives its sessions' tools."""

    session_id: str
    generation: int
    # Backend reference: a container id, a process group id.
    ref: str
    # For logs and `studio-agent status` ("container 3f2a...", "process group 4242").
    description: str


# Who runs a `local` tool (`--local-tool-user`): "session", a user of its own per
# session when the agent is root (the agent's own user otherwise); "agent", the agent's
# own user always (development on a host whose interpreter or state directory other
# users cannot reach; no separation from the agent or between sessions).
TOOL_USERS = ("session", "agent")
# The per-session uids (and gids, the same numbers): (first, count). 0x70000000 is just
# above systemd-nspawn's container range and below 2^31 (systemd's UIDS-GIDS.md), and
# apart from the subordinate ranges rootful podman takes (2^31 - 1 and up).
SESSION_UIDS = (0x70000000, 65536)


@dataclass(frozen=True)
class RuntimeOptions:
    """Agent configuration a backend may need."""

    local_templates: Path | None = None
    local_tool_user: str = "session"
    local_uids: tuple[int, int] = SESSION_UIDS
    # podman: the REST API socket, the OCI runtime name ("" = podman's default) and
    # container ulimits ("nofile=1024:1024"), all agent settings of the host.
    podman_socket: Path = Path("/run/podman/podman.sock")
    oci_runtime: str = ""
    ulimits: tuple[str, ...] = ()
    # podman: each session's network (`--podman-network`): "bridge", a bridge network of
    # its own (isolated from the others, the tool published on the host's 127.0.0.1), or
    # "host", the host's network (unsafe: sessions reach each other and the host's loopback).
    podman_network: str = "bridge"


class Runtime(abc.ABC):
    """One runtime backend. All methods are idempotent where that makes sense:
    stopping or destroying a tool that is already gone succeeds."""

    name: str

    @classmethod
    @abc.abstractmethod
    def available(cls, options: RuntimeOptions) -> tuple[bool, str]:
        """Whether this backend can run tools on this host, and why (for `doctor`)."""

    # This agent's id: every tool is labelled with it (and its session and generation),
    # so the reaper finds tools no handle knows without touching another agent's.
    owner: str = ""

    @abc.abstractmethod
    async def start(self, spec: StartSpec) -> RuntimeHandle:
        """Start the tool and return at once (do not wait for it to answer).

        Raises RuntimeStartError when it cannot be started at all."""

    @abc.abstractmethod
    async def poll(self, handle: RuntimeHandle) -> ExitStatus | None:
        """None while the tool runs, its exit status once it has ended."""

    @abc.abstractmethod
    async def wait(self, handle: RuntimeHandle) -> ExitStatus:
        """Return when the tool has ended."""

    @abc.abstractmethod
    async def stop(self, handle: RuntimeHandle, grace_seconds: float) -> ExitStatus | None:
        """SIGTERM (or the backend's equivalent), then a forced kill after the grace period."""

    @abc.abstractmethod
    async def destroy(self, handle: RuntimeHandle) -> None:
        """Kill at once and free every backend resource of the tool."""

    @abc.abstractmethod
    async def recover(self, handle: RuntimeHandle) -> bool:
        """Re-attach to a tool started by an earlier agent process.

        True when it still runs (and is now tracked), False when it is gone."""

    @abc.abstractmethod
    async def logs(self, handle: RuntimeHandle, max_lines: int = 50) -> str:
        """The last lines of the tool's output."""

    async def reap(self, handle: RuntimeHandle) -> None:
        """Remove what a start killed between creating the tool and recording its
        handle may have left (found by the session's labels); idempotent."""
        return None

    async def labelled_tools(self) -> list[LabelledTool]:
        """Every tool on the host labelled as one of this agent's sessions (`owner`)."""
        return []

    async def remove_labelled(self, tool: LabelledTool) -> None:
        """Kill and remove a tool found by `labelled_tools`; idempotent."""
        return None

    def checkpoint_dir(self, volume_root: Path) -> Path:
        """The directory a checkpoint reads and a restore fills, given the session
        volume: the volume itself for `local`, the overlay's upper dir for `podman`."""
        return volume_root


def connect_variables(spec: StartSpec) -> dict[str, str]:
    """The CONNECT_* variables every runtime gives its tool, over anything of the same
    name (a studio's environment cannot hold one; an image's may)."""
    env = {"CONNECT_TOOL_PORT": str(spec.port)}
    if spec.proxy_secret:
        env[PROXY_SECRET_ENV] = spec.proxy_secret
    return env


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the tool binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
