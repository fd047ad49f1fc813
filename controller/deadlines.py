"""Lost agents and stuck sessions: what no agent will ever report, the controller decides.

A pass of the reconciler (every `interval`):

- an agent with no stream here and no heartbeat for `agent_lost_seconds` (the grace
  period) is *lost*: its active studios become `errored` ("agent lost: <id> last seen
  <time>") with desired `stopped`, so they can be deleted or started elsewhere (placement
  only picks agents that are connected; the start restores the studio's last checkpoint as
  any start does). The studio stays placed on the lost agent: if it comes back still
  running the session, it is told to stop it, and the final checkpoint is the studio's
  own (accepted from the agent it is placed on). If the studio was started elsewhere
  meanwhile, the start recorded the run it left behind (`studio_runs`) and that checkpoint
  is kept by name instead (controller.observed);
- a start (`starting` or `building`: a custom environment's build is start time too) not
  done `starting_deadline_seconds` after it was asked for, or a stop not done
  `stopping_deadline_seconds` after it began, is `errored` naming the step it was stuck in
  (the in-progress step of its progress), with desired `stopped` sent to its agent so that
  nothing of it runs on. A stop the agent reported done while the controller still waits
  for its final checkpoint (controller.observed) is stuck in the step naming that
  checkpoint; the report is applied after all if the checkpoint comes later.

Each studio is changed in one transaction with its row locked, and only if it is still
what the pass found: a report that lands in between wins. Once an hour the pass also
deletes the idempotency keys past their lifetime (controller.idempotency).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select

from controller import lifecycle
from controller.agent_hub import AgentHub
from controller.db import Database
from controller.idempotency import Idempotency
from controller.lifecycle import Status
from controller.models import Agent, Studio, as_utc, utcnow

__all__ = ["DeadlineSettings", "Deadlines"]

log = logging.getLogger(__name__)

_STARTS = (Status.STARTING.value, Status.BUILDING.value)
_ACTIVE = tuple(s.value for s in lifecycle.ACTIVE)
_PURGE_INTERVAL_SECONDS = 3600.0


@dataclass(slots=True)
class DeadlineSettings:
    # Grace period of an agent with no stream and no heartbeat.
    agent_lost_seconds: float = 300.0
    # From the start request (placement, build, restore, tool answering) to `running`.
    starting_deadline_seconds: float = 1800.0
    # From the stop request to `stopped` (the final checkpoint of a large volume included).
    stopping_deadline_seconds: float = 1800.0


class Deadlines:
    def __init__(self, db: Database, hub: AgentHub, settings: DeadlineSettings) -> None:
        self.db = db
        self.hub = hub
        self.settings = settings
        self._next_purge = 0.0

    async def enforce_once(self) -> int:
        """One pass; how many studios it errored."""
        if time.monotonic() >= self._next_purge:
            # Idempotency keys past their lifetime: nothing replays them any more.
            self._next_purge = time.monotonic() + _PURGE_INTERVAL_SECONDS
            purged = await Idempotency(self.db).purge()
            if purged:
                log.info("%d expired idempotency key(s) deleted", purged)
        errored = await self._lost_agents()
        errored += await self._stuck(_STARTS, self.settings.starting_deadline_seconds, "start")
        errored += await self._stuck(
            (Status.STOPPING.value,), self.settings.stopping_deadline_seconds, "stop"
        )
        return errored

    # ------------------------------------------------------------ lost agents

    async def _lost_agents(self) -> int:
        now = utcnow()
        cutoff = now - timedelta(seconds=self.settings.agent_lost_seconds)
        connected = set(self.hub.connected_agents())
        async with self.db.transaction() as session:
            rows = (
                await session.execute(
                    select(Studio.session_id, Studio.agent_id, Agent.last_seen)
                    .join(Agent, Agent.agent_id == Studio.agent_id)
                    .where(
                        Studio.status.in_(_ACTIVE),
                        Studio.deleted.is_(False),
                        # Never seen: the grace runs from its enrollment.
                        or_(
                            Agent.last_seen < cutoff,
                            and_(Agent.last_seen.is_(None), Agent.date_created < cutoff),
                        ),
                    )
                )
            ).all()
        errored = 0
        for session_id, agent_id, last_seen in rows:
            if agent_id is None or agent_id in connected:
                continue  # a stream here: alive, whatever its heartbeats say
            if await self._error_lost(session_id, agent_id, cutoff):
                errored += 1
                log.warning(
                    "studio %s: %s",
                    session_id,
                    lifecycle.agent_lost_message(agent_id, as_utc(last_seen)),
                )
        return errored

    async def _error_lost(self, session_id: str, agent_id: str, cutoff: datetime) -> bool:
        async with self.db.transaction() as session:
            studio = await session.get(Studio, session_id, with_for_update=True)
            agent = await session.get(Agent, agent_id)
            if (
                studio is None
                or agent is None
                or studio.agent_id != agent_id
                or studio.status not in _ACTIVE
            ):
                return False
            if self.hub.is_live(agent):
                return False  # a stream here, or another controller's unexpired lease
            last_seen = as_utc(agent.last_seen)
            heard = last_seen if last_seen is not None else as_utc(agent.date_created)
            if heard is not None and heard >= cutoff:
                return False  # heard from meanwhile (or enrolled within the grace)
            lifecycle.transition(
                studio,
                Status.ERRORED,
                message=lifecycle.agent_lost_message(agent_id, last_seen),
            )
            studio.desired_status = "stopped"
            studio.active_connections = []
        return True

    # ------------------------------------------------------------ stuck starts and stops

    async def _stuck(self, statuses: tuple[str, ...], seconds: float, what: str) -> int:
        cutoff = utcnow() - timedelta(seconds=seconds)
        column = Studio.last_started if what == "start" else Studio.status_updated_at
        async with self.db.transaction() as session:
            ids = (
                await session.scalars(
                    select(Studio.session_id).where(
                        Studio.status.in_(statuses),
                        Studio.deleted.is_(False),
                        column < cutoff,
                    )
                )
            ).all()
        errored = 0
        for session_id in ids:
            agent_id = await self._error_stuck(session_id, statuses, seconds, what, cutoff)
            if agent_id is not None:
                errored += 1
                self.hub.notify(agent_id or None, [session_id])
        return errored

    async def _error_stuck(
        self,
        session_id: str,
        statuses: tuple[str, ...],
        seconds: float,
        what: str,
        cutoff: datetime,
    ) -> str | None:
        """The studio's agent id ("" for none) when it was errored, else None."""
        async with self.db.transaction() as session:
            studio = await session.get(Studio, session_id, with_for_update=True)
            if studio is None or studio.status not in statuses:
                return None
            began = as_utc(studio.last_started if what == "start" else studio.status_updated_at)
            if began is None or began >= cutoff:
                return None
            step = stuck_step(studio)
            message = f"{what} did not finish within {seconds:g} s: stuck in {step}"
            log.warning("studio %s: %s", session_id, message)
            lifecycle.transition(studio, Status.ERRORED, message=message)
            studio.desired_status = "stopped"
            return studio.agent_id or ""


def stuck_step(studio: Studio) -> str:
    """The step a studio's progress shows in progress (else its status message)."""
    for step in reversed(studio.progress or []):
        if step.get("status") == "in-progress" and step.get("message"):
            return str(step["message"])
    return studio.status_message or studio.status
