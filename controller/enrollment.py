"""Agent enrollment: join tokens in, agent certificates out; who an agent is; revocation.

An agent presents a join token (`sjt1.<CA hash>.<secret>`, studios_shared.agent_pki) and a
certificate request for its own key at the enrollment endpoint; `enroll` checks the token
(known, not revoked, not expired, not used up, admitting the compute environment), picks the
agent's id and has the CA sign a certificate naming that id and compute environment. From
then on the agent is its certificate: `admitted` says whether an identity read from a
verified client certificate may connect (enrolled here, not revoked). `revoke_agent` ends an
identity for good; its active sessions become `errored` in the same transaction.

No gRPC here: refusals are `EnrollmentRefused` with a status name the agent service maps to
gRPC codes, and a message that says why (never the token).
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller import lifecycle
from controller.agent_ca import AgentCA, CaError
from controller.auth import hash_token, new_token
from controller.db import Database
from controller.errors import NotFound
from controller.lifecycle import Status
from controller.models import (
    Agent,
    ComputeEnv,
    EnrollmentToken,
    Studio,
    StudioConnection,
    as_utc,
    utcnow,
)
from controller.placement import default_capacity_cap
from studios_shared.agent_pki import AgentIdentity, format_join_token, parse_join_token

__all__ = [
    "AGENT_ID",
    "AgentRow",
    "Enrolled",
    "EnrollmentRefused",
    "Refusal",
    "Revoked",
    "admitted",
    "create_token",
    "enroll",
    "format_time",
    "list_agents",
    "renew",
    "revoke_agent",
]

log = logging.getLogger(__name__)

# An agent id goes into a certificate's CN and URI: letters, digits, '.', '_' and '-'.
AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Refusal(StrEnum):
    """Why, as the gRPC status the agent service answers with."""

    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"


class EnrollmentRefused(Exception):
    def __init__(self, code: Refusal, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Enrolled:
    agent_id: str
    certificate_pem: bytes
    not_after: datetime


def format_time(value: datetime | None) -> str:
    """UTC, to the second: `2026-12-01T16:02:52Z`."""
    when = as_utc(value)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ") if when is not None else ""


def _refuse(code: Refusal, message: str) -> EnrollmentRefused:
    return EnrollmentRefused(code, message)


async def _token_row(session: AsyncSession, token: str | None, ca: AgentCA) -> EnrollmentToken:
    """The usable token row (locked) behind `token`, else the refusal saying why."""
    if not token:
        raise _refuse(
            Refusal.UNAUTHENTICATED, "no join token (authorization: Bearer sjt1.<CA hash>.<secret>)"
        )
    try:
        join = parse_join_token(token)
    except ValueError as exc:
        raise _refuse(Refusal.UNAUTHENTICATED, f"invalid join token: {exc}") from None
    if join.ca_hash != ca.hash:
        raise _refuse(
            Refusal.UNAUTHENTICATED,
            "the join token pins another CA than this controller's "
            f"(sha256 {ca.hash[:12]}...): it is another controller's token",
        )
    row = await session.scalar(
        select(EnrollmentToken)
        .where(EnrollmentToken.token_hash == hash_token(join.secret))
        .with_for_update()
    )
    now = utcnow()
    if row is None:
        raise _refuse(Refusal.UNAUTHENTICATED, "the join token is not one this controller issued")
    if row.revoked_at is not None:
        raise _refuse(
            Refusal.UNAUTHENTICATED,
            f"the join token {row.name!r} was revoked at {format_time(row.revoked_at)}",
        )
    expires = as_utc(row.expires_at)
    if expires is not None and now >= expires:
        raise _refuse(
            Refusal.UNAUTHENTICATED,
            f"the join token {row.name!r} expired at {format_time(expires)}",
        )
    if row.max_uses is not None and row.uses >= row.max_uses:
        raise _refuse(
            Refusal.UNAUTHENTICATED,
            f"the join token {row.name!r} is used up ({row.uses} of {row.max_uses} enrollments)",
        )
    return row


async def _admitted_env(
    session: AsyncSession, row: EnrollmentToken, compute_env_id: str
) -> ComputeEnv:
    if not compute_env_id:
        raise _refuse(Refusal.INVALID_ARGUMENT, "EnrollRequest.compute_env_id is empty")
    if row.compute_env_id is not None and row.compute_env_id != compute_env_id:
        raise _refuse(
            Refusal.PERMISSION_DENIED,
            f"the join token {row.name!r} is bound to compute environment "
            f"{row.compute_env_id}, not {compute_env_id}",
        )
    env = await session.get(ComputeEnv, compute_env_id)
    if env is None:
        raise _refuse(Refusal.NOT_FOUND, f"compute environment {compute_env_id!r} does not exist")
    if row.compute_env_id is None and row.workspace_id != env.workspace_id:
        # A token bound to nothing admits nothing.
        raise _refuse(
            Refusal.PERMISSION_DENIED,
            f"the join token {row.name!r} admits compute environments of workspace "
            f"{row.workspace_id} only; {compute_env_id} is in workspace {env.workspace_id}",
        )
    return env


async def enroll(
    db: Database,
    ca: AgentCA,
    *,
    token: str | None,
    agent_id: str,
    compute_env_id: str,
    csr_pem: bytes,
    hostname: str,
    capacity: dict[str, Any] | None,
    lifetime: timedelta,
) -> Enrolled:
    """Exchange a join token and a CSR for a certificate (one transaction)."""
    async with db.transaction() as session:
        row = await _token_row(session, token, ca)
        await _admitted_env(session, row, compute_env_id)
        agent_id = agent_id or uuid.uuid4().hex
        if not AGENT_ID.match(agent_id):
            raise _refuse(
                Refusal.INVALID_ARGUMENT,
                "EnrollRequest.agent_id: up to 128 letters, digits, '.', '_' and '-'",
            )
        agent = await session.get(Agent, agent_id, with_for_update=True)
        if agent is not None and agent.revoked_at is not None:
            raise _refuse(
                Refusal.PERMISSION_DENIED,
                f"agent {agent_id} was revoked at {format_time(agent.revoked_at)}; a revoked "
                "id never comes back: enroll without an agent id (or under a new one)",
            )
        if agent is not None and agent.enrolled_at is not None:
            raise _refuse(
                Refusal.PERMISSION_DENIED,
                f"agent {agent_id} is enrolled already (revoke it first: "
                f"studio-controller agent revoke {agent_id})",
            )
        try:
            issued = ca.sign_agent(csr_pem, AgentIdentity(agent_id, compute_env_id), lifetime)
        except CaError as exc:
            raise _refuse(Refusal.INVALID_ARGUMENT, str(exc)) from None
        now = utcnow()
        if agent is None:
            # Not yet in GET /agents: that lists agents once they have connected.
            agent = Agent(agent_id=agent_id, compute_env_id=compute_env_id, connected=False)
            session.add(agent)
        # else: a row of an agent that connected before enrollment existed, taken over.
        agent.compute_env_id = compute_env_id
        agent.hostname = hostname[:255]
        agent.enrolled_at = now
        agent.cert_serial = format(issued.serial, "x")
        agent.cert_not_after = issued.not_after
        agent.capacity_cap = default_capacity_cap(capacity) if capacity else {}
        row.uses += 1
        row.last_used = now
        token_name = row.name
    log.info(
        "agent %s enrolled for compute environment %s (host %s, token %r, certificate until %s)",
        agent_id,
        compute_env_id,
        hostname,
        token_name,
        format_time(issued.not_after),
    )
    return Enrolled(agent_id, issued.certificate_pem, issued.not_after)


def _not_admitted(agent: Agent | None, identity: AgentIdentity) -> str | None:
    if agent is None or agent.enrolled_at is None:
        return f"agent {identity.agent_id} is not enrolled with this controller"
    if agent.revoked_at is not None:
        return f"agent {agent.agent_id} was revoked at {format_time(agent.revoked_at)}"
    if agent.compute_env_id != identity.compute_env_id:
        return (
            f"the certificate names compute environment {identity.compute_env_id}; agent "
            f"{agent.agent_id} is enrolled for {agent.compute_env_id}"
        )
    return None


async def admitted(session: AsyncSession, identity: AgentIdentity) -> Agent:
    """The agent row of a verified certificate's identity; UNAUTHENTICATED when it may not
    connect (not enrolled here, revoked)."""
    agent = await session.get(Agent, identity.agent_id)
    reason = _not_admitted(agent, identity)
    if reason is not None:
        raise _refuse(Refusal.UNAUTHENTICATED, reason)
    assert agent is not None
    return agent


async def renew(
    db: Database, ca: AgentCA, identity: AgentIdentity, csr_pem: bytes, lifetime: timedelta
) -> Enrolled:
    """A new certificate for an admitted identity and a new key."""
    async with db.transaction() as session:
        agent = await session.get(Agent, identity.agent_id, with_for_update=True)
        reason = _not_admitted(agent, identity)
        if reason is not None:
            raise _refuse(Refusal.UNAUTHENTICATED, reason)
        assert agent is not None
        try:
            issued = ca.sign_agent(csr_pem, identity, lifetime)
        except CaError as exc:
            raise _refuse(Refusal.INVALID_ARGUMENT, str(exc)) from None
        agent.cert_serial = format(issued.serial, "x")
        agent.cert_not_after = issued.not_after
    log.info(
        "agent %s renewed its certificate (until %s)",
        identity.agent_id,
        format_time(issued.not_after),
    )
    return Enrolled(identity.agent_id, issued.certificate_pem, issued.not_after)


# ---------------------------------------------------------------- operator


async def create_token(
    db: Database,
    ca: AgentCA,
    *,
    name: str,
    compute_env_id: str | None = None,
    workspace_id: int | None = None,
    ttl: timedelta | None = None,
    uses: int | None = None,
) -> str:
    """A new join token (shown once; only the secret's hash is kept).

    Bound to `compute_env_id` when given, else admitting any compute environment of
    `workspace_id` (default 1)."""
    secret = new_token()
    async with db.transaction() as session:
        if compute_env_id is not None:
            env = await session.get(ComputeEnv, compute_env_id)
            if env is None:
                raise NotFound(f"compute environment {compute_env_id} not found")
            workspace_id = env.workspace_id
        session.add(
            EnrollmentToken(
                name=name[:80],
                token_hash=hash_token(secret),
                compute_env_id=compute_env_id,
                workspace_id=workspace_id if workspace_id is not None else 1,
                expires_at=utcnow() + ttl if ttl else None,
                max_uses=uses,
            )
        )
    return format_join_token(secret, ca.hash)


@dataclass(frozen=True)
class AgentRow:
    agent_id: str
    hostname: str
    compute_env_id: str
    enrolled_at: datetime | None
    cert_not_after: datetime | None
    connected: bool
    revoked_at: datetime | None
    capacity_cap: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.agent_id,
            "hostname": self.hostname,
            "computeEnvId": self.compute_env_id,
            "enrolledAt": format_time(self.enrolled_at) or None,
            "certificateNotAfter": format_time(self.cert_not_after) or None,
            "connected": self.connected,
            "revokedAt": format_time(self.revoked_at) or None,
            "capacityCap": self.capacity_cap,
        }


async def list_agents(db: Database) -> list[AgentRow]:
    async with db.transaction() as session:
        agents = (await session.scalars(select(Agent).order_by(Agent.agent_id))).all()
        return [
            AgentRow(
                agent_id=a.agent_id,
                hostname=a.hostname,
                compute_env_id=a.compute_env_id,
                enrolled_at=as_utc(a.enrolled_at),
                cert_not_after=as_utc(a.cert_not_after),
                connected=a.connected,
                revoked_at=as_utc(a.revoked_at),
                capacity_cap=dict(a.capacity_cap or {}),
            )
            for a in agents
        ]


@dataclass(frozen=True)
class Revoked:
    agent_id: str
    revoked_at: datetime
    # Sessions that were active on the agent and are errored now.
    errored: list[str]
    already: bool = False


# A session on these may hold resources on its agent (a build runs there too).
_ON_AGENT = [s.value for s in lifecycle.ACTIVE]


async def revoke_agent(db: Database, agent_id: str) -> Revoked:
    """Revoke an agent for good; its active sessions become `errored` (same transaction).

    A running controller ends the agent's stream at its next reconciler pass and refuses
    it from then on; the errored sessions can be deleted, or started elsewhere from their
    last checkpoint."""
    async with db.transaction() as session:
        agent = await session.get(Agent, agent_id, with_for_update=True)
        if agent is None:
            raise NotFound(f"agent {agent_id} not found")
        if agent.revoked_at is not None:
            return Revoked(agent_id, as_utc(agent.revoked_at) or utcnow(), [], already=True)
        now = utcnow()
        agent.revoked_at = now
        message = lifecycle.agent_revoked_message(agent_id, now)
        studios = (
            await session.scalars(
                select(Studio)
                .where(
                    Studio.agent_id == agent_id,
                    Studio.deleted.is_(False),
                    Studio.status.in_(_ON_AGENT),
                )
                .with_for_update()
            )
        ).all()
        for studio in studios:
            lifecycle.transition(studio, Status.ERRORED, message=message, now=now)
            # Nothing is to run there any more; a start places it anew.
            studio.desired_status = "stopped"
            studio.active_connections = []
        # Its proxy is no longer believed: the visits it left open end now (the audit
        # would otherwise list them as open for ever).
        open_visits = (
            await session.scalars(
                select(StudioConnection).where(
                    StudioConnection.agent_id == agent_id, StudioConnection.closed_at.is_(None)
                )
            )
        ).all()
        for visit in open_visits:
            visit.closed_at, visit.closed_by = (
                max(now, as_utc(visit.opened_at) or now),
                "agentRevoked",
            )
        errored = [s.session_id for s in studios]
    log.warning("agent %s revoked; sessions errored: %s", agent_id, errored or "none")
    return Revoked(agent_id, now, errored)
