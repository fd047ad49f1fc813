"""Desired state of sessions, as sent to agents (`SessionDesired`).

Built from the database every time it is sent. A session is described to an
agent as DELETED when the studio is deleted, unknown, or placed on another
agent: the agent is to stop it and forget every local trace.

Secrets and trust (docs/contract-notes.md "Which agent may say what"):
- data-link keys go only into the spec of a start: a studio placed on the agent
  the message is for, desired RUNNING and still starting; every other message
  (stops, deletes, later copies of a running session's state) carries none;
- a restore point is sent only when it lies in the studio's compute-environment
  checkpoint store (`controller.stores.checkpoint_refusal`, the check the agent
  applies too). A start whose restore point lies elsewhere (a row an older
  controller recorded from any agent) errors with the reason; nothing is restored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from studios.agent.v1 import agent_pb2

from controller import lifecycle
from controller.access import connect_access
from controller.lifecycle import Status
from controller.models import Checkpoint, ComputeEnv, Studio, StudioRun
from controller.mounts import (
    DataLinkMountSpec,
    FileSystemMountSpec,
    data_link_mounts,
    file_system_mount_specs,
)
from controller.stores import checkpoint_base_uri, checkpoint_refusal

__all__ = ["build_desired_state", "session_desired"]

log = logging.getLogger(__name__)

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
    if status != "running":
        data_links = ()  # the keys go only with a start
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
            conda_environment=str(config.get("condaEnvironment") or ""),
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
    mounts = await data_link_mounts(
        session, [s for s in studios if s.agent_id == agent_id and _is_start(s)], envs
    )
    unsaved_runs = await _unsaved_runs_left_on(
        session, agent_id, [s for s in studios if s.agent_id != agent_id and not s.deleted]
    )
    out = agent_pb2.DesiredState(full=full)
    for sid in sorted(set(by_id) | wanted):
        studio = by_id.get(sid)
        left = unsaved_runs.get(sid)
        if left is not None:
            # A run this agent was left with (it was lost, the studio started elsewhere)
            # whose final checkpoint has not been recorded: stopped, not forgotten, so
            # the agent keeps its data until a checkpoint holds it (a DELETED would drop
            # it if that checkpoint failed). Forgotten once recorded.
            out.sessions.append(
                agent_pb2.SessionDesired(
                    session_id=sid, status=agent_pb2.DESIRED_STATUS_STOPPED, generation=left
                )
            )
            continue
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
        env = envs.get(studio.compute_env_id)
        restore = restores.get(studio.restore_checkpoint_id or -1)
        if restore is not None:
            why = _restore_refusal(restore, env)
            if why:
                restore = None
                await _refuse_start(session, studio, why)
        out.sessions.append(
            session_desired(studio, env, restore, mounts.get(studio.session_id, ()))
        )
    # Who may connect now, for the sessions whose proxy route is live.
    await _add_session_access(session, out, by_id)
    return out


async def _unsaved_runs_left_on(
    session: AsyncSession, agent_id: str, studios: Sequence[Studio]
) -> dict[str, int]:
    """{session id: generation} of the runs left on `agent_id` (controller.deadlines)
    whose final checkpoint from it is not recorded yet, among `studios`."""
    if not studios:
        return {}
    runs = (
        await session.scalars(
            select(StudioRun).where(
                StudioRun.agent_id == agent_id,
                StudioRun.session_id.in_([s.session_id for s in studios]),
            )
        )
    ).all()
    out: dict[str, int] = {}
    for run in runs:
        saved = await session.scalar(
            select(Checkpoint.id).where(
                Checkpoint.session_id == run.session_id,
                Checkpoint.generation == run.generation,
                Checkpoint.status == "finalized",
            )
        )
        if saved is None:
            out[run.session_id] = max(out.get(run.session_id, 0), run.generation)
    return out


def _is_start(studio: Studio) -> bool:
    """The studio's desired state is a start its agent may still be carrying out."""
    return (
        not studio.deleted
        and studio.desired_status == "running"
        and Status(studio.status) in (Status.STARTING, Status.BUILDING)
    )


def _restore_refusal(restore: Checkpoint, env: ComputeEnv | None) -> str:
    """Why the studio's restore point is not to be sent ("" when it may be)."""
    if env is None:
        return f"checkpoint {restore.name} has no compute environment store to lie in"
    why = checkpoint_refusal(restore.uri, env.work_dir)
    if not why:
        return ""
    return (
        f"checkpoint {restore.name} ({restore.uri}) lies outside the compute environment's "
        f"checkpoint store {checkpoint_base_uri(env.work_dir)}: {why}"
    )


async def _refuse_start(session: AsyncSession, studio: Studio, why: str) -> None:
    """Error a start whose restore point is refused (sent as STOPPED: nothing runs)."""
    if not _is_start(studio):
        # A run that has started already keeps running; its restore point is simply not sent.
        log.debug("studio %s: restore point not sent: %s", studio.session_id, why)
        return
    restore_id, generation = studio.restore_checkpoint_id, studio.generation
    await session.refresh(studio, with_for_update=True)
    if (
        not _is_start(studio)
        or studio.restore_checkpoint_id != restore_id
        or studio.generation != generation
    ):
        return  # changed meanwhile: the next message is built from what it is now
    log.warning("studio %s: start refused: %s", studio.session_id, why)
    lifecycle.transition(
        studio, Status.ERRORED, message=f"cannot start: {why}; it was not restored"
    )
    studio.desired_status = "stopped"


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
