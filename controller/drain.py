"""Draining agents (`studio-agent drain`): what the controller does with what they say.

An agent says how its host is being drained in its Hello and, when that changes on a
live stream, in a Heartbeat of its own (agent.proto DrainMode). The controller records
it on the agent (`agents.drain`, shown by GET /agents); placement skips a draining agent
(controller.placement). In "stop" mode the agent's running studios are stopped as a
user's stop would (desired stopped: each goes stopping -> stopped with its final
checkpoint); the stop is applied again on each of its Heartbeats, which catches a start
that was under way when the drain began once it is running. In "wait" mode they run on.
"""

from __future__ import annotations

import logging

from sqlalchemy import select, update
from studios.agent.v1 import agent_pb2

from controller import lifecycle
from controller.agent_hub import AgentHub
from controller.db import Database
from controller.lifecycle import Status
from controller.models import Agent, Studio

__all__ = ["DRAIN_STEP", "drain_mode", "record_drain", "stop_for_drain"]

log = logging.getLogger(__name__)

DRAIN_STEP = "stopping the session: its host is being drained"

_MODES: dict[int, str] = {agent_pb2.DRAIN_MODE_STOP: "stop", agent_pb2.DRAIN_MODE_WAIT: "wait"}


def drain_mode(value: int) -> str:
    """The wire's DrainMode as stored: "" (not draining), "stop" or "wait"."""
    return _MODES.get(int(value), "")


async def record_drain(db: Database, agent_id: str, mode: str) -> None:
    async with db.transaction() as session:
        await session.execute(
            update(Agent)
            .where(Agent.agent_id == agent_id)
            .values(drain=mode)
            .execution_options(synchronize_session=False)
        )
    log.info(
        "agent %s %s",
        agent_id,
        f"is draining ({mode}): no new placements" if mode else "is no longer draining",
    )


async def stop_for_drain(db: Database, hub: AgentHub, agent_id: str) -> list[str]:
    """Stop the running studios of a draining agent ("stop" mode); their session ids."""
    stopped: list[str] = []
    async with db.transaction() as session:
        studios = (
            await session.scalars(
                select(Studio)
                .where(
                    Studio.agent_id == agent_id,
                    Studio.status == Status.RUNNING.value,
                    Studio.desired_status == "running",
                    Studio.deleted.is_(False),
                )
                .with_for_update()
            )
        ).all()
        for studio in studios:
            studio.desired_status = "stopped"
            studio.progress = [{"message": DRAIN_STEP, "status": "in-progress", "warnings": []}]
            lifecycle.transition(
                studio, Status.STOPPING, message=f"stopping: agent {agent_id} is draining"
            )
            stopped.append(studio.session_id)
    if stopped:
        log.info("agent %s draining: stopping studios %s", agent_id, ", ".join(stopped))
        hub.notify(agent_id, stopped)
    return stopped
