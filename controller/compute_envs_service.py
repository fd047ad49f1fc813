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
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from controller.agent_hub import AgentHub
from controller.auth import (
    Permission,
    Principal,
    require,
    workspace_role,
    workspace_role_or_404,
)
from controller.checkpoint_gc import last_gc_runs
from controller.db import Database
from controller.errors import BadRequest, Conflict, NotFound
from controller.models import Agent, CheckpointGcRun, ComputeEnv, Studio, Workspace, utcnow
from controller.mounts import validate_allowed_buckets, validate_file_system_mounts
from controller.requests import ComputeEnvCreateBody

__all__ = [
    "PLATFORM",
    "STATUSES",
    "UNSAFE_HOST_DIRS",
    "AgentListing",
    "ComputeEnvListing",
    "ComputeEnvOps",
    "ComputeEnvService",
    "ComputeEnvView",
    "host_path_refusal",
]

PLATFORM = "studio-agent"
# The reference's ComputeEnv.Status values an environment of ours takes.
STATUSES = ("AVAILABLE", "DISABLED")

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
                taken = await _name_taken(session, workspace_id, body.name)
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

    async def list_envs(
        self, principal: Principal, workspace_id: int, status: str | None = None
    ) -> ComputeEnvListing:
        """The workspace's live compute environments by name (of one status, given one),
        with their stores' last GC run."""
        filters: list[Any] = [
            ComputeEnv.workspace_id == workspace_id,
            ComputeEnv.deleted.is_(False),
        ]
        if status:
            if status.upper() not in STATUSES:
                raise BadRequest(f"status: must be one of {', '.join(STATUSES)}, got {status!r}")
            filters.append(ComputeEnv.status == status.upper())
        async with self.db.transaction() as session:
            role = await workspace_role_or_404(session, principal.user_id, workspace_id)
            require(role, Permission.READ)
            workspace = await session.get(Workspace, workspace_id)
            envs = (
                await session.scalars(select(ComputeEnv).where(*filters).order_by(ComputeEnv.name))
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
        return [AgentListing(a, self.hub.is_live(a)) for a in agents]


def _check_name(name: str | None) -> str:
    """A compute environment's name: the reference's 1 to 100 characters, not blank."""
    if name is None or not 1 <= len(name) <= 100 or name != name.strip():
        raise BadRequest(
            "name: a compute environment name has 1 to 100 characters, without leading or "
            f"trailing spaces, got {name!r}"
        )
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise BadRequest("name: must not contain control characters")
    return name


async def _name_taken(
    session: AsyncSession, workspace_id: int, name: str, exclude: str | None = None
) -> bool:
    query = select(ComputeEnv.id).where(
        ComputeEnv.workspace_id == workspace_id,
        ComputeEnv.name == name,
        ComputeEnv.deleted.is_(False),
    )
    if exclude is not None:
        query = query.where(ComputeEnv.id != exclude)
    return (await session.scalar(query)) is not None


async def _env(
    session: AsyncSession,
    principal: Principal,
    env_id: str,
    workspace_id: int | None,
    permission: Permission,
) -> ComputeEnv:
    """A live environment the caller may use: 404 for another workspace's, a deleted or an
    unknown one (never 403, so ids do not leak), 403 below `permission`."""
    missing = NotFound(f"compute environment {env_id} not found")
    env = await session.get(ComputeEnv, env_id)
    if env is None or env.deleted:
        raise missing
    if workspace_id is not None and env.workspace_id != workspace_id:
        raise missing
    role = await workspace_role(session, principal.user_id, env.workspace_id)
    if role is None:
        raise missing
    require(role, permission)
    return env


@dataclass(frozen=True, slots=True)
class ComputeEnvView:
    env: ComputeEnv
    workspace: Workspace | None


class ComputeEnvOps:
    """The reference's operations on one compute environment (describe, update, delete,
    disable, enable, primary, validate) and name validation. Roles: any participant
    describes and validates names; admins and owners change them (studio-roles.md)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def describe(
        self, principal: Principal, env_id: str, workspace_id: int | None
    ) -> ComputeEnvView:
        async with self.db.transaction() as session:
            env = await _env(session, principal, env_id, workspace_id, Permission.READ)
            return ComputeEnvView(env, await session.get(Workspace, env.workspace_id))

    async def validate_name(
        self, principal: Principal, workspace_id: int, name: str | None
    ) -> None:
        _check_name(name)
        assert name is not None
        async with self.db.transaction() as session:
            role = await workspace_role_or_404(session, principal.user_id, workspace_id)
            require(role, Permission.READ)
            if await _name_taken(session, workspace_id, name):
                raise Conflict(f"name: a compute environment named {name!r} already exists")

    async def update(
        self,
        principal: Principal,
        env_id: str,
        workspace_id: int | None,
        *,
        name: str | None,
        description: str | None,
    ) -> None:
        """Rename or re-describe; both are safe while studios use the environment (they
        refer to it by id)."""
        if name is not None:
            _check_name(name)
        taken = Conflict(f"name: a compute environment named {name!r} already exists")
        try:
            async with self.db.transaction() as session:
                env = await _env(session, principal, env_id, workspace_id, Permission.ADMIN)
                if name is not None and name != env.name:
                    if await _name_taken(session, env.workspace_id, name, exclude=env.id):
                        raise taken
                    env.name = name
                if description is not None:
                    env.description = description or None
                env.last_updated = utcnow()
                await session.flush()
        except IntegrityError:
            raise taken from None

    async def delete(self, principal: Principal, env_id: str, workspace_id: int | None) -> None:
        """Delete an environment no live studio uses (409 naming them). The row is kept
        (deleted studios keep referring to it) and its name freed."""
        async with self.db.transaction() as session:
            env = await _env(session, principal, env_id, workspace_id, Permission.ADMIN)
            users = (
                await session.execute(
                    select(Studio.session_id, Studio.name)
                    .where(Studio.compute_env_id == env.id, Studio.deleted.is_(False))
                    .order_by(Studio.name)
                )
            ).all()
            if users:
                named = ", ".join(f"{name!r} ({sid})" for sid, name in users)
                raise Conflict(
                    f"compute environment {env.name!r} ({env.id}) is used by studios: {named}; "
                    "delete them or move them to another environment first"
                )
            env.deleted = True
            env.is_primary = False
            env.last_updated = utcnow()

    async def set_status(
        self, principal: Principal, env_id: str, workspace_id: int | None, status: str
    ) -> None:
        """Disable (no new starts; no longer primary) or enable again."""
        async with self.db.transaction() as session:
            env = await _env(session, principal, env_id, workspace_id, Permission.ADMIN)
            env.status = status
            if status == "DISABLED":
                env.is_primary = False
            env.last_updated = utcnow()

    async def make_primary(
        self, principal: Principal, env_id: str, workspace_id: int | None
    ) -> None:
        """The workspace's primary environment becomes this one (the others are not)."""
        async with self.db.transaction() as session:
            env = await _env(session, principal, env_id, workspace_id, Permission.ADMIN)
            if env.status == "DISABLED":
                raise Conflict(
                    f"compute environment {env.name!r} ({env.id}) is disabled and cannot be "
                    "primary; enable it first"
                )
            await session.execute(
                update(ComputeEnv)
                .where(ComputeEnv.workspace_id == env.workspace_id, ComputeEnv.id != env.id)
                .values(is_primary=False)
            )
            env.is_primary = True

    async def validate(
        self, principal: Principal, env_id: str, workspace_id: int | None
    ) -> ComputeEnv:
        """The reference's pre-flight re-check. An environment of ours has no credentials
        or work directory the controller can probe (its agents check their own), so an
        enabled one is AVAILABLE; a disabled one cannot be validated (400)."""
        async with self.db.transaction() as session:
            env = await _env(session, principal, env_id, workspace_id, Permission.ADMIN)
            if env.status == "DISABLED":
                raise BadRequest(
                    f"compute environment {env.name!r} ({env.id}) is disabled: enable it first"
                )
            return env
