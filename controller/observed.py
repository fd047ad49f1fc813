"""Applying what agents report (observed state) to the database.

Rules (docs/contract-notes.md "Generations", "Which agent may say what"): every
message is first decided by `controller.agent_authorizer` (only what concerns a
studio placed on the sending agent is applied; a refusal is logged with the agent,
the session and the reason); observations of a generation older than the studio's
current one are ignored; a status the lifecycle does
not allow from the current one is logged and ignored (the rest of the
observation is still stored). Each method runs in its own transaction and
returns the agents and sessions whose desired state must be (re)sent, which
the caller hands to the hub after the commit.

Connection visits (the audit, `visit`): recorded once per (agent, visit id), the close
filled in by the copy that carries it; acknowledged (or refused) so that the agent
drops its copy. `proxy_restarted` closes, at the agent's Hello, the visits a previous
run of its proxy left open (`closed_by` "agentRestart", closed when learned).

A `stopped` report that names its run's final checkpoint (`final_checkpoint_key`) is
applied only once that checkpoint is recorded (docs/contract-notes.md "Checkpoint events
and their acknowledgement"): until then the studio stays (or becomes) `stopping`, so a
start is refused rather than restoring the checkpoint before it, and its progress ends
with a step naming the checkpoint awaited (what the stop deadline reports if it never
comes). The report is held in memory (`_held_stops`) and applied when that checkpoint's
event is recorded; a controller that never heard it (a restart, another controller
after a failover) gets it again in the agent's next Inventory, which follows the agent's
unacknowledged events.

A replaced stream (the agent reconnected, here or at another controller) may still hold
messages read before the newer stream took over: they are not applied (checked with the
studios' rows locked), since an Inventory from before a start would declare the started
session lost; the agent says everything again on its newer stream.

The wire's enums become the strings stored and shown (`_VOLUME_KIND`,
`_MOUNT_STATE`). A V1 agent sends volume kinds and mount states only as the
retired strings, which read here as UNSPECIFIED: the value stored before is kept
(docs/contract-notes.md "Protocol versions").
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from studios.agent.v1 import agent_pb2

from controller import agent_authorizer as authorizer
from controller import lifecycle
from controller.agent_authorizer import Decision, Verdict
from controller.agent_hub import AgentStream
from controller.db import Database
from controller.lifecycle import Status
from controller.models import (
    Agent,
    Checkpoint,
    ComputeEnv,
    Studio,
    StudioBuild,
    StudioConnection,
    StudioRun,
    User,
    Workspace,
    as_utc,
    utcnow,
)

__all__ = [
    "ObservationHandler",
    "capacity_dict",
    "checkpoint_display_name",
    "proxy_instance_id",
    "recovered_name",
]

log = logging.getLogger(__name__)

# The most of a failed build's log kept (what the agent sends is 256 KiB at most).
_BUILD_LOG_MAX = 512 * 1024

_STEP_STATUS = {
    agent_pb2.STEP_STATUS_UNSPECIFIED: "pending",
    agent_pb2.STEP_STATUS_PENDING: "pending",
    agent_pb2.STEP_STATUS_IN_PROGRESS: "in-progress",
    agent_pb2.STEP_STATUS_SUCCEEDED: "succeeded",
    agent_pb2.STEP_STATUS_ERRORED: "errored",
}

_CHECKPOINT_STATUS = {
    agent_pb2.CHECKPOINT_STATUS_UNSPECIFIED: "empty",
    agent_pb2.CHECKPOINT_STATUS_EMPTY: "empty",
    agent_pb2.CHECKPOINT_STATUS_INTERIM: "interim",
    agent_pb2.CHECKPOINT_STATUS_FINALIZED: "finalized",
    agent_pb2.CHECKPOINT_STATUS_INVALID: "invalid",
}


# Volume.volume_kind as stored in `studios.volume["kind"]`.
_VOLUME_KIND = {
    agent_pb2.VOLUME_KIND_DIRECTORY: "directory",
    agent_pb2.VOLUME_KIND_XFS_LOOP: "xfs-loop",
}

# DataLinkMountStatus.mount_state as stored in `studios.data_link_status` and shown
# as `mountState`.
_MOUNT_STATE = {
    agent_pb2.DATA_LINK_MOUNT_STATE_MOUNTED: "mounted",
    agent_pb2.DATA_LINK_MOUNT_STATE_READ_ONLY: "read-only",
    agent_pb2.DATA_LINK_MOUNT_STATE_FAILED: "failed",
    agent_pb2.DATA_LINK_MOUNT_STATE_UNMOUNTED: "unmounted",
}


def capacity_dict(capacity: agent_pb2.HostCapacity) -> dict[str, Any]:
    return {
        "cpus": capacity.cpus,
        "memoryBytes": capacity.memory_bytes,
        "memoryAvailableBytes": capacity.memory_available_bytes,
        "diskFreeBytes": capacity.disk_free_bytes,
        "diskBudgetFreeBytes": capacity.disk_budget_free_bytes,
    }


# Ids as the agent's proxy draws them (Hello.proxy_instance_id too), a session id, and
# times an agent may report (ms, 2000-2100). Checked before anything reaches a query:
# PostgreSQL refuses a NUL in text and an int32 column's parameter beyond int32.
_VISIT_ID = re.compile(r"[0-9a-f]{32}")
_INSTANCE_ID = re.compile(r"[0-9a-f]{0,32}")
_SESSION_ID = re.compile(r"[0-9a-f]{8}")
_VISIT_MS = (946_684_800_000, 4_102_444_800_000)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
AGENT_RESTART = "agentRestart"


def proxy_instance_id(hello: agent_pb2.Hello) -> str:
    """The Hello's proxy run id, or "" (none, or not one a proxy draws)."""
    text = hello.proxy_instance_id
    return text if _INSTANCE_ID.fullmatch(text) else ""


def _ms_time(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _visit_malformed(visit: agent_pb2.ConnectionVisit) -> str:
    """Why a ConnectionVisit cannot be recorded as sent ("" when it can)."""
    low, high = _VISIT_MS
    if _VISIT_ID.fullmatch(visit.visit_id) is None:
        return "visit_id is not 32 lower-case hex digits"
    if _SESSION_ID.fullmatch(visit.session_id) is None:
        return f"session_id {visit.session_id[:16]!r} is not a session id"
    if not 0 < visit.user_id < 2**31:
        return "user_id is not a user id"
    if not low <= visit.opened_at_ms < high:
        return "opened_at_ms is not a time between 2000 and 2100"
    if visit.closed_at_ms and not low <= visit.closed_at_ms < high:
        return "closed_at_ms is not a time between 2000 and 2100"
    if _INSTANCE_ID.fullmatch(visit.proxy_instance_id) is None:
        return "proxy_instance_id is not at most 32 lower-case hex digits"
    try:
        ipaddress.ip_address(visit.client_address)
    except ValueError:
        return f"client_address {visit.client_address[:64]!r} is not an IP address"
    return ""


def checkpoint_display_name(studio_name: str, n: int) -> str:
    return f"{studio_name.replace(' ', '_')}_{n}"


def _progress(steps: Iterable[agent_pb2.ProgressStep]) -> list[dict[str, Any]]:
    out = []
    for step in steps:
        text = step.name
        if step.message:
            text = f"{text}: {step.message}" if text else step.message
        if step.status == agent_pb2.STEP_STATUS_IN_PROGRESS and 0 < step.percent < 100:
            text = f"{text} ({step.percent:.0f}%)"
        out.append(
            {
                "message": text,
                "status": _STEP_STATUS.get(step.status, "pending"),
                "warnings": list(step.warnings),
            }
        )
    return out


async def _record_build(
    session: AsyncSession, studio: Studio, generation: int, build: agent_pb2.EnvironmentBuild
) -> None:
    """The build's outcome, once per generation (the agent repeats it with each report)."""
    row = await session.get(StudioBuild, studio.session_id, with_for_update=True)
    if row is not None and row.generation == generation:
        return
    if row is None:
        row = StudioBuild(session_id=studio.session_id)
        session.add(row)
    row.generation = generation
    row.env_hash = build.env_hash[:64]
    row.image = build.image
    row.cached = build.cached
    row.failed = build.failed
    row.seconds = max(0.0, build.seconds)
    # The agent bounds it (agent.sessions.build); so does the controller.
    row.log = build.log[:_BUILD_LOG_MAX]
    row.log_truncated = build.log_truncated or len(build.log) > _BUILD_LOG_MAX
    row.finished_at = utcnow()


def _mount_state(
    mount: agent_pb2.DataLinkMountStatus, before: dict[str, Any] | None, generation: int
) -> str | None:
    """A mount's state to store; UNSPECIFIED (a V1 agent) keeps the run's earlier one.

    None when nothing is known: shown as a null `mountState`, as before any report.
    """
    state = _MOUNT_STATE.get(mount.mount_state)
    if state is not None or not before or before.get("generation") != generation:
        return state
    for earlier in before.get("mounts") or []:
        if (earlier.get("dataLinkId"), earlier.get("mountName")) == (
            mount.data_link_id,
            mount.mount_name,
        ):
            known = earlier.get("state")
            return known if isinstance(known, str) else None
    return None


def recovered_name(studio_name: str, agent_id: str) -> str:
    """The name of a run's checkpoint recovered from a lost agent (spaces as underscores,
    as every checkpoint name)."""
    return f"{studio_name} (recovered from agent {agent_id})".replace(" ", "_")[:240]


async def _record_recovered(
    session: AsyncSession,
    studio: Studio,
    agent_id: str,
    event: agent_pb2.CheckpointEvent,
    status: str,
    saved: datetime,
) -> tuple[agent_pb2.CheckpointAckResult, str]:
    """Keep the final checkpoint of a run the studio left behind on `agent_id` as a named
    checkpoint of its own: never merged into the run's earlier row (the one a later run
    may have restored), never the default restore point (`recovered_from_agent`)."""
    recorded = agent_pb2.CHECKPOINT_ACK_RESULT_RECORDED
    existing = await session.scalar(
        select(Checkpoint)
        .where(Checkpoint.session_id == studio.session_id, Checkpoint.key == event.key)
        .with_for_update()
    )
    if existing is not None:
        if existing.recovered_from_agent is None:
            # The run's own row already names this very object (an interim event sent
            # before the agent was lost): a copy, nothing new to keep.
            return recorded, ""
        existing.status, existing.size_bytes = status, event.size_bytes
        return recorded, ""
    taken = set(
        (
            await session.scalars(
                select(Checkpoint.name).where(Checkpoint.session_id == studio.session_id)
            )
        ).all()
    )
    base = recovered_name(studio.name, agent_id)
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    session.add(
        Checkpoint(
            session_id=studio.session_id,
            name=name,
            key=event.key,
            uri=event.uri,
            status=status,
            size_bytes=event.size_bytes,
            author_user_id=studio.started_by_user_id or studio.user_id,
            generation=event.generation,
            date_saved=saved,
            recovered_from_agent=agent_id,
        )
    )
    log.warning(
        "studio %s: final checkpoint of run %d recovered from agent %s as %r",
        studio.session_id,
        event.generation,
        agent_id,
        name,
    )
    return recorded, ""


def awaiting_final_step(key: str, generation: int) -> dict[str, Any]:
    """The progress step a studio shows while its `stopped` waits for checkpoint `key`; the
    stop deadline names it as the step the stop was stuck in (controller.deadlines)."""
    return {
        "message": (
            f"waiting for the final checkpoint {key} of run {generation}: the agent reported "
            "the session stopped before its checkpoint event was recorded"
        ),
        "status": "in-progress",
        "warnings": [],
    }


@dataclass(slots=True)
class _HeldStop:
    """A `stopped` report waiting for its final checkpoint to be recorded."""

    agent_id: str
    observed: agent_pb2.SessionObserved


class _Superseded(Exception):
    """The stream an observation came on was replaced while it was applied."""


async def _superseded(session: AsyncSession, stream: AgentStream) -> bool:
    """Whether a newer stream of the agent took over: here (`stream.superseded`) or at
    another controller sharing the database (the agent's row names that one)."""
    if stream.superseded:
        return True
    if not stream.controller_id:
        return False
    holder = await session.scalar(
        select(Agent.controller_id).where(Agent.agent_id == stream.agent_id)
    )
    # None: a sweep took a lease that ran out while the stream lived; it is still here.
    return holder is not None and holder != stream.controller_id


def _log_refusal(agent_id: str, session_id: str, what: str, decision: Decision) -> None:
    log.log(
        logging.DEBUG if decision.quiet else logging.WARNING,
        "agent %s: %s of session %s ignored: %s",
        agent_id,
        what,
        session_id,
        decision.reason,
    )


class ObservationHandler:
    def __init__(self, db: Database) -> None:
        self.db = db
        # By session id: the newest report of each session that is held (`_hold_stop`).
        self._held_stops: dict[str, _HeldStop] = {}

    async def heartbeat(self, agent_id: str) -> None:
        async with self.db.transaction() as session:
            agent = await session.get(Agent, agent_id)
            if agent is not None:
                agent.last_seen = utcnow()

    async def capacity(self, agent_id: str, capacity: agent_pb2.HostCapacity) -> None:
        # Placement trusts what is stored: never more than the agent's cap (issue 12).
        from controller.placement import clamp_capacity

        async with self.db.transaction() as session:
            agent = await session.get(Agent, agent_id)
            if agent is not None:
                agent.capacity = clamp_capacity(capacity_dict(capacity), agent.capacity_cap or {})
                agent.last_seen = utcnow()

    async def session_observed(
        self, stream: AgentStream, observed: agent_pb2.SessionObserved
    ) -> set[str]:
        """Apply one SessionObserved; the session ids to re-send to this agent."""
        async with self.db.transaction() as session:
            return await self._apply_session(session, stream, observed)

    async def inventory(self, stream: AgentStream, inventory: agent_pb2.Inventory) -> set[str]:
        """Apply a full Inventory; the session ids to re-send to this agent.

        Nothing, if a newer stream of the agent took over (here or at another controller)
        before this one's locks were held: what it leaves out may have started since, and
        would be declared lost."""
        try:
            async with self.db.transaction() as session:
                return await self._apply_inventory(session, stream, inventory)
        except _Superseded:
            log.info("agent %s: Inventory of a replaced stream ignored", stream.agent_id)
            return set()

    async def _apply_inventory(
        self, session: AsyncSession, stream: AgentStream, inventory: agent_pb2.Inventory
    ) -> set[str]:
        resend: set[str] = set()
        reported = {o.session_id for o in inventory.sessions}
        # A full set: what the agent no longer reports is no longer foreign.
        stream.foreign_sessions = set()
        for observed in inventory.sessions:
            resend |= await self._apply_session(session, stream, observed)
        placed = (
            await session.scalars(
                select(Studio).where(Studio.agent_id == stream.agent_id).with_for_update()
            )
        ).all()
        # Checked with the rows locked: a newer stream's report of these studios commits
        # either before (and the replacement is seen here) or after this transaction.
        if await _superseded(session, stream):
            raise _Superseded
        for studio in placed:
            if studio.session_id in reported:
                continue
            if studio.deleted:
                # The agent has forgotten it: nothing is left to tell.
                studio.agent_id = None
                continue
            status = Status(studio.status)
            if status not in lifecycle.ACTIVE:
                continue
            if status == Status.STARTING:
                # A start the agent does not know yet: placed on this very stream
                # (the inventory may predate it), or it never received it (a
                # controller killed between the placement's commit and the send, an
                # agent killed before it saved the session). Nothing of this
                # generation has run there, so the agent is told again and starts it;
                # erroring it would fail a start that nothing went wrong with.
                resend.add(studio.session_id)
                continue
            lifecycle.transition(
                studio,
                Status.ERRORED,
                message=f"session lost: agent {stream.agent_id} no longer has it",
            )
            # The agent must not start this generation again from scratch.
            studio.desired_status = "stopped"
            resend.add(studio.session_id)
        return resend

    async def _apply_session(
        self, session: AsyncSession, stream: AgentStream, observed: agent_pb2.SessionObserved
    ) -> set[str]:
        sid = observed.session_id
        studio = await session.get(Studio, sid, with_for_update=True)
        if stream.superseded:
            # Locked: a newer stream's report of the session is either seen by this
            # transaction or waits for it; an older report must not undo it.
            log.info("agent %s: report of %s from a replaced stream ignored", stream.agent_id, sid)
            return set()
        decision = authorizer.session_observed(stream.agent_id, sid, observed.generation, studio)
        if decision.verdict is Verdict.STALE:
            log.debug("studio %s: old generation %d ignored", sid, observed.generation)
            return set()
        if not decision.accepted:
            _log_refusal(stream.agent_id, sid, "state", decision)
            if decision.foreign:
                # Unknown, deleted or placed elsewhere: the agent gets DELETED (never
                # this studio's spec), and nothing it says changes the studio.
                stream.foreign_sessions.add(sid)
                return {sid}
            return set()
        assert studio is not None
        stream.foreign_sessions.discard(sid)
        now = utcnow()
        if observed.tool_port:
            studio.tool_port = observed.tool_port
        if observed.root_dir:
            studio.root_dir = observed.root_dir
        if observed.HasField("volume"):
            before = studio.volume or {}
            studio.volume = {
                # UNSPECIFIED (a V1 agent): the kind known before, if any.
                "kind": _VOLUME_KIND.get(observed.volume.volume_kind) or before.get("kind", ""),
                "path": observed.volume.path,
                "sizeBytes": observed.volume.size_bytes,
                "usedBytes": observed.volume.used_bytes,
            }
        if observed.progress:
            studio.progress = _progress(observed.progress)
        if observed.data_links:
            # The run's mounts as the agent reports them (shown in mountedDataLinks).
            studio.data_link_status = {
                "generation": observed.generation,
                "mounts": [
                    {
                        "dataLinkId": m.data_link_id,
                        "mountName": m.mount_name,
                        "state": _mount_state(m, studio.data_link_status, observed.generation),
                        "message": m.message or None,
                    }
                    for m in observed.data_links
                ],
            }
        studio.last_updated = now
        if observed.HasField("build"):
            await _record_build(session, studio, observed.generation, observed.build)
        if await self._hold_stop(session, studio, stream.agent_id, observed):
            return set()
        return self._apply_status(studio, observed)

    async def _hold_stop(
        self,
        session: AsyncSession,
        studio: Studio,
        agent_id: str,
        observed: agent_pb2.SessionObserved,
    ) -> bool:
        """Whether `observed` is a `stopped` to hold: its run's final checkpoint (named by
        the report) is not recorded yet. A start from `stopped` restores the studio's
        newest recorded checkpoint, which would then be the one before the final one."""
        sid = studio.session_id
        key = observed.final_checkpoint_key
        current = Status(studio.status)
        if (
            observed.status != agent_pb2.SESSION_STATUS_STOPPED
            or not key
            or current == Status.STOPPED
            or not lifecycle.can_transition(current, Status.STOPPED)
        ):
            # No checkpoint named (none written, or an agent older than the field): as
            # before. A newer report of the session also ends any hold of an older one.
            self._held_stops.pop(sid, None)
            return False
        recorded = await session.scalar(
            select(Checkpoint.id)
            .where(Checkpoint.session_id == sid, Checkpoint.key == key)
            .limit(1)
        )
        step = awaiting_final_step(key, observed.generation)
        others = [s for s in studio.progress or [] if s != step]
        if recorded is not None:
            self._held_stops.pop(sid, None)
            studio.progress = others  # a report without progress leaves the step shown
            return False
        held = agent_pb2.SessionObserved()
        held.CopyFrom(observed)
        self._held_stops[sid] = _HeldStop(agent_id, held)
        if current in (Status.STARTING, Status.RUNNING):
            # The stop this controller has not seen begin: from here it runs under the
            # stop deadline, and a start is refused as for any stopping studio.
            lifecycle.transition(studio, Status.STOPPING, message="stopping")
            studio.active_connections = []
        studio.progress = [*others, step]
        log.warning(
            "studio %s: agent %s reports run %d stopped before its final checkpoint %s was "
            "recorded; the studio stays %s until it is",
            sid,
            agent_id,
            observed.generation,
            key,
            studio.status,
        )
        return True

    async def _apply_held_stop(self, stream: AgentStream, event: agent_pb2.CheckpointEvent) -> None:
        """Apply the `stopped` held for `event`'s checkpoint, now that it is recorded."""
        held = self._held_stops.get(event.session_id)
        if (
            held is None
            or held.agent_id != stream.agent_id
            or held.observed.generation != event.generation
            or held.observed.final_checkpoint_key != event.key
        ):
            return
        async with self.db.transaction() as session:
            # The whole report again, as if just received: every check of a report applies
            # (the studio may have moved on meanwhile). A `stopped` never asks for a re-send.
            await self._apply_session(session, stream, held.observed)
        # Only once applied: should that fail, the event goes unacknowledged and its next
        # copy tries again.
        if self._held_stops.get(event.session_id) is held:
            del self._held_stops[event.session_id]

    def _apply_status(self, studio: Studio, observed: agent_pb2.SessionObserved) -> set[str]:
        current = Status(studio.status)
        message = observed.message or None
        target: Status | None = {
            agent_pb2.SESSION_STATUS_STARTING: Status.STARTING,
            agent_pb2.SESSION_STATUS_RUNNING: Status.RUNNING,
            agent_pb2.SESSION_STATUS_STOPPING: Status.STOPPING,
            agent_pb2.SESSION_STATUS_STOPPED: Status.STOPPED,
            agent_pb2.SESSION_STATUS_ERRORED: Status.ERRORED,
            agent_pb2.SESSION_STATUS_BUILDING: Status.BUILDING,
            agent_pb2.SESSION_STATUS_BUILD_FAILED: Status.BUILD_FAILED,
        }.get(observed.status)
        if target is None:
            return set()
        resend: set[str] = set()
        if studio.desired_status == "stopped" and target in (
            Status.BUILDING,
            Status.STARTING,
            Status.RUNNING,
        ):
            # The agent has not seen the stop yet (or lost it): keep
            # "stopping" and tell it again.
            resend.add(studio.session_id)
            if current == Status.STOPPING:
                return resend
        if target == Status.STARTING and current not in (Status.STARTING, Status.BUILDING):
            return resend
        if not lifecycle.can_transition(current, target):
            log.info(
                "studio %s: agent reports %s while %s; status kept",
                studio.session_id,
                target,
                current,
            )
            return resend
        lifecycle.transition(studio, target, message=message)
        if target != Status.RUNNING and studio.active_connections:
            studio.active_connections = []  # a stopped tool has nobody connected
        return resend

    async def connections(self, stream: AgentStream, conns: agent_pb2.SessionConnections) -> None:
        """Who is connected to a studio through the agent's proxy (a full list)."""
        async with self.db.transaction() as session:
            studio = await session.get(Studio, conns.session_id, with_for_update=True)
            decision = authorizer.connections(stream.agent_id, conns.session_id, studio)
            if not decision.accepted:
                _log_refusal(stream.agent_id, conns.session_id, "connections", decision)
                return
            assert studio is not None
            entries = list(conns.connections) if studio.status == Status.RUNNING else []
            users = (
                {
                    u.id: u
                    for u in (
                        await session.scalars(
                            select(User).where(User.id.in_([c.user_id for c in entries]))
                        )
                    ).all()
                }
                if entries
                else {}
            )
            studio.active_connections = [
                {
                    "id": c.user_id,
                    "userName": users[c.user_id].user_name if c.user_id in users else c.user_name,
                    "email": users[c.user_id].email if c.user_id in users else "",
                    "avatar": None,
                    "lastActive": (
                        datetime.fromtimestamp(c.last_active, UTC)
                        .isoformat(timespec="milliseconds")
                        .replace("+00:00", "Z")
                        if c.last_active
                        else None
                    ),
                }
                for c in sorted(entries, key=lambda c: c.user_id)
            ]

    async def checkpoint(
        self, stream: AgentStream, event: agent_pb2.CheckpointEvent
    ) -> agent_pb2.CheckpointAck:
        """Record one CheckpointEvent; the ack to send once this has returned (committed).

        Idempotent by (session, key): a copy of an event already recorded changes
        nothing and is acknowledged again, so an agent that lost the first ack
        can drop its copy.
        """
        result, message = await self._record_checkpoint(stream, event)
        if result == agent_pb2.CHECKPOINT_ACK_RESULT_RECORDED:
            await self._apply_held_stop(stream, event)
        return agent_pb2.CheckpointAck(
            session_id=event.session_id,
            key=event.key,
            generation=event.generation,
            result=result,
            message=message,
        )

    async def _record_checkpoint(
        self, stream: AgentStream, event: agent_pb2.CheckpointEvent
    ) -> tuple[agent_pb2.CheckpointAckResult, str]:
        recorded = agent_pb2.CHECKPOINT_ACK_RESULT_RECORDED
        superseded = agent_pb2.CHECKPOINT_ACK_RESULT_SUPERSEDED
        async with self.db.transaction() as session:
            # The studio row's lock serialises the events of one session across
            # controllers sharing a database: two copies of an event never both insert.
            studio = await session.get(Studio, event.session_id, with_for_update=True)
            env = await session.get(ComputeEnv, studio.compute_env_id) if studio else None
            left_behind = (
                await session.get(StudioRun, (studio.session_id, event.generation))
                if studio is not None
                and (studio.agent_id != stream.agent_id or event.generation < studio.generation)
                else None
            )
            decision = authorizer.checkpoint_event(
                stream.agent_id,
                event.session_id,
                event.generation,
                event.uri,
                studio,
                env,
                left_behind,
            )
            if not decision.accepted:
                _log_refusal(
                    stream.agent_id, event.session_id, f"checkpoint {event.key!r}", decision
                )
                # Acknowledged as REFUSED, so the agent drops it: nothing of it is kept
                # here, and an event that is not the agent's to send never becomes so
                # by being sent again (docs/contract-notes.md "Which agent may say what").
                return agent_pb2.CHECKPOINT_ACK_RESULT_REFUSED, decision.reason
            assert studio is not None
            status = _CHECKPOINT_STATUS.get(event.status, "empty")
            saved = datetime.fromtimestamp(event.saved_at, UTC) if event.saved_at > 0 else utcnow()
            if decision.recovered:
                return await _record_recovered(
                    session, studio, stream.agent_id, event, status, saved
                )
            # One checkpoint per session run: the agent refreshes the run's checkpoint
            # (interim) and finalizes it at stop; each event names the newest stored
            # object, and the run's row is updated to it (same key: a re-send).
            existing = await session.scalar(
                select(Checkpoint)
                .where(
                    Checkpoint.session_id == studio.session_id,
                    or_(Checkpoint.key == event.key, Checkpoint.generation == event.generation)
                    if event.generation > 0
                    else Checkpoint.key == event.key,
                )
                .order_by((Checkpoint.key == event.key).desc(), Checkpoint.id.desc())
                .limit(1)
                .with_for_update()
            )
            if existing is not None:
                if existing.key == event.key and existing.status == status:
                    return recorded, ""  # a copy of an event already recorded
                if existing.status == "finalized" and status == "interim":
                    # A late re-send of an older event.
                    return superseded, f"run {event.generation} already has its final checkpoint"
                before = as_utc(existing.date_saved)
                if existing.key != event.key and before is not None:
                    if saved < before or (saved == before and event.key < existing.key):
                        # An older refresh of this run, re-sent late.
                        return superseded, f"a newer checkpoint of run {event.generation} exists"
                existing.status = status
                existing.key = event.key
                existing.uri = event.uri or existing.uri
                existing.size_bytes = event.size_bytes
                existing.date_saved = saved
                return recorded, ""
            count = await session.scalar(
                select(func.count())
                .select_from(Checkpoint)
                .where(Checkpoint.session_id == studio.session_id)
            )
            taken = set(
                (
                    await session.scalars(
                        select(Checkpoint.name).where(Checkpoint.session_id == studio.session_id)
                    )
                ).all()
            )
            n = (count or 0) + 1
            while checkpoint_display_name(studio.name, n) in taken:
                n += 1
            session.add(
                Checkpoint(
                    session_id=studio.session_id,
                    name=checkpoint_display_name(studio.name, n),
                    key=event.key,
                    uri=event.uri,
                    status=status,
                    size_bytes=event.size_bytes,
                    author_user_id=studio.started_by_user_id or studio.user_id,
                    generation=event.generation,
                    date_saved=saved,
                )
            )
        return recorded, ""

    # ------------------------------------------------------------ the connection audit

    async def proxy_restarted(self, agent_id: str, proxy_instance_id: str) -> int:
        """Close the visits of `agent_id` that another run of its proxy left open (its
        clients went with it); how many. Nothing for an agent that names no run."""
        if not proxy_instance_id:
            return 0
        async with self.db.transaction() as session:
            rows = (
                await session.scalars(
                    select(StudioConnection)
                    .where(
                        StudioConnection.agent_id == agent_id,
                        StudioConnection.closed_at.is_(None),
                        StudioConnection.proxy_instance_id != proxy_instance_id,
                    )
                    .with_for_update()
                )
            ).all()
            now = utcnow()
            for row in rows:
                row.closed_at = max(now, as_utc(row.opened_at) or now)
                row.closed_by = AGENT_RESTART
        if rows:
            log.info(
                "agent %s: its proxy restarted; %d visit(s) it left open closed",
                agent_id,
                len(rows),
            )
        return len(rows)

    async def visit(
        self, stream: AgentStream, visit: agent_pb2.ConnectionVisit
    ) -> agent_pb2.ConnectionVisitAck:
        """Record one ConnectionVisit; the ack to send once this has returned (committed).

        Idempotent by (agent, visit id): the open inserts the row (a close alone does
        too), the close fills in `closed_at`, a copy changes nothing. A real close time
        replaces one the controller set when the proxy's run ended (`proxy_restarted`).
        """
        why = _visit_malformed(visit) or await self._record_visit(stream, visit)
        if why:
            _log_refusal(
                stream.agent_id,
                visit.session_id,
                f"connection visit {visit.visit_id[:32]!r}",
                Decision(Verdict.REFUSE, why),
            )
        return agent_pb2.ConnectionVisitAck(
            visit_id=visit.visit_id,
            closed_at_ms=visit.closed_at_ms,
            refused=bool(why),
            message=why,
        )

    async def _record_visit(self, stream: AgentStream, visit: agent_pb2.ConnectionVisit) -> str:
        """Record `visit` (well-formed); why not ("" when recorded)."""
        opened = _ms_time(visit.opened_at_ms)
        closed = max(opened, _ms_time(visit.closed_at_ms)) if visit.closed_at_ms else None
        async with self.db.transaction() as session:
            row = await session.scalar(
                select(StudioConnection)
                .where(
                    StudioConnection.agent_id == stream.agent_id,
                    StudioConnection.visit_id == visit.visit_id,
                )
                .with_for_update()
            )
            if row is not None:
                if row.session_id != visit.session_id:
                    return f"visit {visit.visit_id} is of session {row.session_id}"
                if closed is not None and (row.closed_at is None or row.closed_by is not None):
                    row.closed_at, row.closed_by = closed, None
                return ""
            studio = await session.get(Studio, visit.session_id)
            decision = authorizer.connection_visit(stream.agent_id, visit.session_id, studio)
            if not decision.accepted:
                return decision.reason
            assert studio is not None
            workspace = await session.get(Workspace, studio.workspace_id)
            if workspace is None or workspace.deleted:
                return f"the workspace of session {visit.session_id} was deleted"
            user = await session.get(User, visit.user_id)
            closed_by = None
            if closed is None and visit.proxy_instance_id != stream.proxy_instance_id:
                # Reported open by a run of the proxy that is gone (from the agent's
                # outbox after a restart): it ended with that run.
                closed, closed_by = max(utcnow(), opened), AGENT_RESTART
            session.add(
                StudioConnection(
                    workspace_id=studio.workspace_id,
                    session_id=studio.session_id,
                    studio_name=studio.name,
                    agent_id=stream.agent_id,
                    visit_id=visit.visit_id,
                    proxy_instance_id=visit.proxy_instance_id,
                    user_id=visit.user_id,
                    # The controller's name for the user; the cookie's (which the controller
                    # signed) for a user it no longer has.
                    user_name=(
                        user.user_name
                        if user is not None
                        else _CONTROL.sub("", visit.user_name)[:255]
                    ),
                    client_address=str(ipaddress.ip_address(visit.client_address)),
                    opened_at=opened,
                    closed_at=closed,
                    closed_by=closed_by,
                )
            )
        return ""
