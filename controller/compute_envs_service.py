"""Compute environments and their agents: the decisions behind ``/compute-envs`` and ``/agents``.

A compute environment of platform ``studio-agent`` is a named pool of agents
sharing a work directory (checkpoints go to ``<workDir>/.studios/checkpoints``)
and a disk budget per host (`bootDiskSizeGb`), optionally with a cap per session
(`sessionDiskCapGb`, an addition: the most one session's volume may grow to on a
host; absent, the whole budget). Results are database rows; the web layer
(`controller.web_compute_envs`) gives them their REST shape.

File-system mounts' host paths (`host_path_refusal`): absolute, normalised (no
``.``, ``..`` or empty segments; one trailing ``/`` is dropped) and none of the plainly unsafe:
the host's root, its system directories (or a directory holding one), container
stores and the state of Studios itself (``/var/lib/studios*``). This is only the
controller's sieve: the agent mounts nothing outside the prefixes its operator
allows (``--allow-host-path``), whatever the database says.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from controller.agent_hub import AgentHub
from controller.auth import Permission, Principal, require, workspace_role_or_404
from controller.checkpoint_gc import last_gc_runs
from controller.db import Database
from controller.errors import BadRequest, Conflict
from controller.models import Agent, CheckpointGcRun, ComputeEnv, Workspace, utcnow
from controller.mounts import validate_allowed_buckets, validate_file_system_mounts
from controller.requests import ComputeEnvCreateBody

__all__ = [
    "PLATFORM",
    "UNSAFE_HOST_DIRS",
    "AgentListing",
    "ComputeEnvListing",
    "ComputeEnvService",
    "host_path_refusal",
]

PLATFORM = "studio-agent"

# Never a host path of a file-system mount, nor anything inside or above one of them
# (bind-mounted read-write into a container whose tool may run as root).
UNSAFE_HOST_DIRS = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var/lib/containers",
    "/var/lib/docker",
    "/var/run",
)
# The state of Studios' agents and controller (/var/lib/studios, /var/lib/studios-agent...).
_STUDIOS_STATE = re.compile(r"^/var/lib/studios[^/]*(/|$)")
_STUDIOS_STATE_PARENT = "/var/lib/studios"


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def host_path_refusal(path: str) -> str | None:
    """Why `path` is a plainly unsafe host path for a file-system mount; None if it is not."""
    if not path.startswith("/"):
        return f"must be an absolute path, got {path!r}"
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "must not contain control characters"
    if path == "/":
        return "/ is the host's root directory"
    # One trailing "/" is how many write a directory: it is stored without it.
    segments = path.removesuffix("/").split("/")[1:]
    if ".." in segments:
        return "must not contain '..'"
    if any(s in ("", ".") for s in segments):
        return f"{path!r} is not a normalised path (no '.' or empty segments)"
    path = path.removesuffix("/")
    for unsafe in UNSAFE_HOST_DIRS:
        if _inside(path, unsafe):
            return f"{path} is inside the host's system directory {unsafe}"
        if _inside(unsafe, path):
            return f"{path} holds the host's system directory {unsafe}"
    if _STUDIOS_STATE.match(path) or _inside(_STUDIOS_STATE_PARENT, path):
        return f"{path} is or holds the state of Studios (/var/lib/studios*)"
    return None


@dataclass(frozen=True, slots=True)
class ComputeEnvListing:
    workspace_name: str
    envs: Sequence[ComputeEnv]
    # The newest checkpoint GC run of each environment's store, by environment id.
    gc_runs: dict[str, CheckpointGcRun]


@dataclass(frozen=True, slots=True)
class AgentListing:
    agent: Agent
    connected: bool


class ComputeEnvService:
    def __init__(self, db: Database, hub: AgentHub) -> None:
        self.db = db
        self.hub = hub

    async def create(
        self, principal: Principal, workspace_id: int, body: ComputeEnvCreateBody
    ) -> str:
        """Store a new compute environment; returns its id."""
        if body.platform != PLATFORM:
            raise BadRequest(f"computeEnv.platform: must be {PLATFORM!r}, got {body.platform!r}")
        config = body.config
        # Checked before anything is stored (controller.mounts says what is refused and why).
        for n, mount in enumerate(config.file_system_mounts):
            why = host_path_refusal(mount.host_path)
            if why is not None:
                raise BadRequest(f"config.fileSystemMounts.{n}.hostPath: {why}")
        fs_mounts = validate_file_system_mounts(config.file_system_mounts)
        cap = config.session_disk_cap_gb
        if cap is not None and cap > config.boot_disk_size_gb:
            raise BadRequest(
                f"config.sessionDiskCapGb: {cap} is more than the whole budget "
                f"(bootDiskSizeGb {config.boot_disk_size_gb})"
            )
        allowed_buckets = validate_allowed_buckets(body.config.allowed_buckets)
        try:
            async with self.db.transaction() as session:
                role = await workspace_role_or_404(session, principal.user_id, workspace_id)
                require(role, Permission.ADMIN)
                taken = await session.scalar(
                    select(ComputeEnv.id).where(
                        ComputeEnv.workspace_id == workspace_id, ComputeEnv.name == body.name
                    )
                )
                if taken:
                    raise Conflict(f"a compute environment named {body.name!r} already exists")
                while True:
                    env_id = secrets.token_hex(8)
                    if await session.get(ComputeEnv, env_id) is None:
                        break
                now = utcnow()
                session.add(
                    ComputeEnv(
                        id=env_id,
                        workspace_id=workspace_id,
                        name=body.name,
                        platform=PLATFORM,
                        work_dir=body.config.work_dir,
                        boot_disk_size_gb=body.config.boot_disk_size_gb,
                        session_disk_cap_gb=cap,
                        allowed_buckets=allowed_buckets,
                        file_system_mounts=fs_mounts,
                        date_created=now,
                        last_updated=now,
                    )
                )
        except IntegrityError:
            # Lost a race with a concurrent create of the same name.
            raise Conflict(f"a compute environment named {body.name!r} already exists") from None
        return env_id

    async def list_envs(self, principal: Principal, workspace_id: int) -> ComputeEnvListing:
        """The workspace's compute environments by name, with their stores' last GC run."""
        async with self.db.transaction() as session:
            role = await workspace_role_or_404(session, principal.user_id, workspace_id)
            require(role, Permission.READ)
            workspace = await session.get(Workspace, workspace_id)
            envs = (
                await session.scalars(
                    select(ComputeEnv)
                    .where(ComputeEnv.workspace_id == workspace_id)
                    .order_by(ComputeEnv.name)
                )
            ).all()
            gc_runs = await last_gc_runs(session, [e.id for e in envs])
        return ComputeEnvListing(workspace.name if workspace else "", envs, gc_runs)

    async def agents(self, principal: Principal, workspace_id: int) -> list[AgentListing]:
        """Agents of the workspace's compute environments that have connected, by id."""
        async with self.db.transaction() as session:
            role = await workspace_role_or_404(session, principal.user_id, workspace_id)
            require(role, Permission.READ)
            agents = (
                await session.scalars(
                    select(Agent)
                    .join(ComputeEnv, ComputeEnv.id == Agent.compute_env_id)
                    .where(
                        ComputeEnv.workspace_id == workspace_id,
                        # Enrolled but never connected: `studio-controller agent list`.
                        Agent.last_seen.is_not(None),
                    )
                    .order_by(Agent.agent_id)
                )
            ).all()
        return [AgentListing(a, self.hub.is_connected(a.agent_id)) for a in agents]
