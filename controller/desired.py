"""Desired state of sessions, as sent to agents (`SessionDesired`).

Built from the database every time it is sent. A session is described to an
agent as DELETED when the studio is deleted, unknown, or placed on another
agent: the agent is to stop it and forget every local trace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from studios.agent.v1 import agent_pb2

from controller.access import connect_access
from controller.models import Checkpoint, ComputeEnv, Studio
from controller.mounts import (
    DataLinkMountSpec,
    FileSystemMountSpec,
    data_link_mounts,
    file_system_mount_specs,
)
from controller.stores import checkpoint_base_uri

__all__ = ["build_desired_state", "session_desired"]

_DESIRED = {
    "running": agent_pb2.DESIRED_STATUS_RUNNING,
    "stopped": agent_pb2.DESIRED_STATUS_STOPPED,
    "deleted": agent_pb2.DESIRED_STATUS_DELETED,
}


def _data_link_mount(spec: DataLinkMountSpec) -> agent_pb2.DataLinkMount:
    return agent_pb2.DataLinkMount(
        data_link_id=spec.data_link_id,
        mount_name=spec.mount_name,
        resource_ref=spec.resource_ref,
        read_only=spec.read_only,
        region=spec.region,
        required=spec.required,
        endpoint=spec.endpoint,
        access_key_id=spec.access_key_id,
        secret_access_key=spec.secret_access_key,
    )


def _file_system_mount(spec: FileSystemMountSpec) -> agent_pb2.FileSystemMount:
    return agent_pb2.FileSystemMount(
        host_path=spec.host_path, mount_path=spec.mount_path, read_only=spec.read_only
    )


def session_desired(
    studio: Studio,
    compute_env: ComputeEnv | None,
    restore: Checkpoint | None,
    data_links: Iterable[DataLinkMountSpec] = (),
) -> agent_pb2.SessionDesired:
    config = studio.configuration or {}
    status = "deleted" if studio.deleted else studio.desired_status
    msg = agent_pb2.SessionDesired(
        session_id=studio.session_id,
        status=_DESIRED[status],
        generation=studio.generation,
        spec=agent_pb2.SessionSpec(
            image=studio.template_repository,
            tool=studio.tool,
            environment={str(k): str(v) for k, v in (config.get("environment") or {}).items()},
            cpu=int(config.get("cpu") or 0),
            memory_mib=int(config.get("memory") or 0),
            gpu=int(config.get("gpu") or 0),
            studio_name=studio.name,
            checkpoint_base_uri=checkpoint_base_uri(compute_env.work_dir) if compute_env else "",
            boot_disk_size_gb=compute_env.boot_disk_size_gb if compute_env else 0,
            session_disk_cap_gb=(compute_env.session_disk_cap_gb or 0) if compute_env else 0,
            # Mounts (controller.mounts): data-links of the configuration, and
            # the compute environment's file-system mounts.
            data_links=[_data_link_mount(m) for m in data_links],
            file_system_mounts=[
                _file_system_mount(m) for m in file_system_mount_specs(compute_env)
            ],
        ),
    )
    if restore is not None:
        msg.restore.CopyFrom(agent_pb2.CheckpointRef(checkpoint_id=restore.id, uri=restore.uri))
    return msg


async def build_desired_state(
    session: AsyncSession,
    agent_id: str,
    *,
    full: bool,
    session_ids: Iterable[str] = (),
    foreign: Iterable[str] = (),
) -> agent_pb2.DesiredState:
    """The DesiredState message for `agent_id`.

    full=True: every studio placed on the agent plus `foreign` (reported by the
    agent, not placed on it) as DELETED. full=False: only `session_ids`.
    """
    wanted = set(session_ids) | set(foreign)
    if full:
        placed = (await session.scalars(select(Studio).where(Studio.agent_id == agent_id))).all()
        extra_ids = wanted - {s.session_id for s in placed}
        extra = (
            (await session.scalars(select(Studio).where(Studio.session_id.in_(extra_ids)))).all()
            if extra_ids
            else []
        )
        studios = list(placed) + list(extra)
    else:
        studios = list(
            (await session.scalars(select(Studio).where(Studio.session_id.in_(wanted)))).all()
        )
    by_id = {s.session_id: s for s in studios}
    envs = {
        e.id: e
        for e in (
            await session.scalars(
                select(ComputeEnv).where(ComputeEnv.id.in_({s.compute_env_id for s in studios}))
            )
        ).all()
    }
    restore_ids = {s.restore_checkpoint_id for s in studios if s.restore_checkpoint_id}
    restores = (
        {
            c.id: c
            for c in (
                await session.scalars(select(Checkpoint).where(Checkpoint.id.in_(restore_ids)))
            ).all()
        }
        if restore_ids
        else {}
    )
    mounts = await data_link_mounts(session, [s for s in studios if s.agent_id == agent_id], envs)
    out = agent_pb2.DesiredState(full=full)
    for sid in sorted(set(by_id) | wanted):
        studio = by_id.get(sid)
        if studio is None or studio.agent_id != agent_id:
            # Unknown here, or placed elsewhere: the agent forgets it.
            out.sessions.append(
                agent_pb2.SessionDesired(
                    session_id=sid,
                    status=agent_pb2.DESIRED_STATUS_DELETED,
                    generation=studio.generation if studio else 0,
                )
            )
            continue
        out.sessions.append(
            session_desired(
                studio,
                envs.get(studio.compute_env_id),
                restores.get(studio.restore_checkpoint_id or -1),
                mounts.get(studio.session_id, ()),
            )
        )
    # Who may connect now, for the sessions whose proxy route is live.
    await _add_session_access(session, out, by_id)
    return out


async def _add_session_access(
    session: AsyncSession, desired: agent_pb2.DesiredState, studios: Mapping[str, Studio]
) -> None:
    """Fill `access` of the active, live sessions in `desired` (by session id in `studios`)."""
    shown = [
        studios[msg.session_id]
        for msg in desired.sessions
        if msg.status != agent_pb2.DESIRED_STATUS_DELETED and msg.session_id in studios
    ]
    access = await connect_access(session, shown)
    for msg in desired.sessions:
        users = access.get(msg.session_id)
        if users is None or msg.status == agent_pb2.DESIRED_STATUS_DELETED:
            continue
        # Present even when empty: an empty list means "nobody", absent means "not narrowed".
        msg.access.SetInParent()
        msg.access.user_ids.extend(users)
