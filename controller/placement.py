"""Placement: which agent runs a session that is to start.

A start leaves the studio `starting` with desired RUNNING and no agent; the
placer picks a connected agent of the studio's compute environment (the one
with the most available memory), records it and tells that agent. Without a
connected agent the studio waits, with a message and a pending "placing"
step; the reconciler calls `place_pending` again when an agent connects and
periodically.

Several controllers (controller.notify): the candidates are every live agent of the
environment, wherever its stream is (its lease in the database has not run out); the
placing controller's `notify` reaches the agent through the controller holding it.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller import lifecycle
from controller.agent_hub import AgentHub
from controller.db import Database
from controller.lifecycle import Status
from controller.models import Agent, ComputeEnv, Studio, utcnow

__all__ = ["PLACING_STEP", "Placer", "clamp_capacity", "default_capacity_cap", "waiting_message"]

log = logging.getLogger(__name__)

PLACING_STEP = "placing the session on an agent"


# Reported "available" amounts and the totals they can never exceed.
_AVAILABLE_OF = {"memoryAvailableBytes": "memoryBytes"}


def default_capacity_cap(reported: dict[str, Any]) -> dict[str, int]:
    """The cap an agent gets at enrollment: what its host reported then.

    Amounts that come and go (available memory) are capped by their total instead of the
    moment's value, so a busy host at enrollment is not held to its busiest hour."""
    cap = {key: int(value or 0) for key, value in reported.items()}
    for available, total in _AVAILABLE_OF.items():
        if available in cap or total in cap:
            cap[available] = max(cap.get(available, 0), cap.get(total, 0))
    return cap


def clamp_capacity(reported: dict[str, Any], cap: dict[str, Any]) -> dict[str, Any]:
    """`reported` with each field no larger than its cap (a field without a cap is kept).

    Placement trusts stored capacity: no report can buy more than the operator allows."""
    out = dict(reported)
    for key, limit in cap.items():
        if key in out and limit is not None:
            out[key] = min(int(out[key] or 0), int(limit))
    return out


def waiting_message(compute_env_id: str) -> str:
    return f"waiting for an agent of compute environment {compute_env_id}"


class Placer:
    def __init__(self, db: Database, hub: AgentHub) -> None:
        self.db = db
        self.hub = hub

    async def place_pending(self, session_ids: list[str] | None = None) -> int:
        """Place starting studios without an agent; the number placed."""
        placed: list[tuple[str, str]] = []
        async with self.db.transaction() as session:
            query = select(Studio).where(
                Studio.status == Status.STARTING.value,
                Studio.desired_status == "running",
                Studio.agent_id.is_(None),
                Studio.deleted.is_(False),
            )
            if session_ids is not None:
                query = query.where(Studio.session_id.in_(session_ids))
            pending = (await session.scalars(query.with_for_update())).all()
            for studio in pending:
                env = await session.get(ComputeEnv, studio.compute_env_id)
                if env is not None and env.status == "DISABLED":
                    # Disabled after this start was asked for: it waits, saying why,
                    # until the environment is enabled again (or the studio stopped).
                    lifecycle.set_message(
                        studio, f"compute environment {env.name!r} ({env.id}) is disabled"
                    )
                    continue
                agent = await self._choose(session, studio.compute_env_id)
                now = utcnow()
                if agent is None:
                    lifecycle.set_message(studio, waiting_message(studio.compute_env_id))
                    studio.progress = [
                        {"message": PLACING_STEP, "status": "pending", "warnings": []}
                    ]
                    continue
                studio.agent_id = agent.agent_id
                studio.placed_at = now
                if env is not None:
                    env.last_used = now
                studio.progress = [
                    {
                        "message": f"{PLACING_STEP}: placed on agent {agent.agent_id}",
                        "status": "succeeded",
                        "warnings": [],
                    }
                ]
                lifecycle.set_message(studio, f"starting on agent {agent.agent_id}")
                placed.append((agent.agent_id, studio.session_id))
        for agent_id, session_id in placed:
            log.info("studio %s placed on agent %s", session_id, agent_id)
            self.hub.notify(agent_id, [session_id])
        return len(placed)

    async def _choose(self, session: AsyncSession, compute_env_id: str) -> Agent | None:
        if self.hub.clustered:
            query = select(Agent).where(
                Agent.compute_env_id == compute_env_id,
                Agent.revoked_at.is_(None),
                Agent.connected.is_(True),
                Agent.lease_expires_at > utcnow(),
            )
        else:
            candidates = self.hub.connected_agents(compute_env_id)
            if not candidates:
                return None
            query = select(Agent).where(Agent.agent_id.in_(candidates), Agent.revoked_at.is_(None))
        agents = [
            a
            for a in (await session.scalars(query)).all()
            # A draining agent (`studio-agent drain`) takes no new session.
            if self.hub.is_live(a) and not a.drain
        ]
        if not agents:
            return None
        return max(
            agents,
            key=lambda a: (int((a.capacity or {}).get("memoryAvailableBytes") or 0), a.agent_id),
        )
