"""The reconciler: a periodic pass that drives observed state toward desired.

Each pass places pending starts, ends the streams of agents revoked meanwhile (by
`studio-controller agent revoke`, possibly on another controller), stops sessions
past their lifespan and errors the studios of lost agents and the starts and stops
past their deadline (controller.deadlines); every
`resync_interval` it also queues the full desired set for every connected
agent, each on its own schedule spread over the interval (messages are
idempotent, so a lost one is repaired without anyone noticing). An agent
connecting wakes it early.

Several controllers (controller.leader): ending revoked streams and the resync concern
this controller's own streams and run everywhere; placement and lifespans are shared
work and run on the controller holding the "reconciler" lease. (A start request places
its studio at once wherever it arrives; placement locks the studio rows, so that is
safe beside the leader's pass.) `resync_interval` 0 turns the resync off (tests that
prove the notification path delivers).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from sqlalchemy import select

from controller.agent_hub import AgentHub
from controller.deadlines import Deadlines
from controller.leader import Leader, run_once_across_controllers
from controller.lifespan import LifespanEnforcer
from controller.models import Agent, as_utc, utcnow
from controller.periodic import PeriodicPass
from controller.placement import Placer

__all__ = ["Reconciler"]

log = logging.getLogger(__name__)


class Reconciler(PeriodicPass):
    name = "reconciler pass"
    # Set by the controller when several controllers may share the database.
    leader: Leader | None = None

    def __init__(
        self,
        placer: Placer,
        hub: AgentHub,
        *,
        interval: float,
        resync_interval: float,
        lifespans: LifespanEnforcer | None = None,
        lifespan_interval: float = 30.0,
        deadlines: Deadlines | None = None,
    ) -> None:
        super().__init__(interval)
        self.placer = placer
        self.lifespans = lifespans
        self.lifespan_interval = lifespan_interval
        self._last_lifespan_check = float("-inf")
        self.deadlines = deadlines
        self.hub = hub
        self.resync_interval = resync_interval

    async def run_once(self) -> None:
        await self.end_revoked_streams()
        await self.shared_pass()

    @run_once_across_controllers("reconciler")
    async def shared_pass(self) -> None:
        await self.placer.place_pending()
        # Lifespans are hours long: checking every `lifespan_interval` is plenty.
        if (
            self.lifespans is not None
            and time.monotonic() - self._last_lifespan_check >= self.lifespan_interval
        ):
            self._last_lifespan_check = time.monotonic()
            await self.lifespans.enforce_once()
        if self.deadlines is not None:
            # Lost agents and stuck starts and stops: no agent will report those.
            await self.deadlines.enforce_once()

    async def end_revoked_streams(self) -> int:
        """End the open streams of revoked agents; how many."""
        connected = self.hub.connected_agents()
        if not connected:
            return 0
        async with self.placer.db.transaction() as session:
            rows = (
                await session.execute(
                    select(Agent.agent_id, Agent.revoked_at).where(
                        Agent.agent_id.in_(connected), Agent.revoked_at.is_not(None)
                    )
                )
            ).all()
        ended = 0
        for agent_id, revoked_at in rows:
            when = as_utc(revoked_at) or utcnow()
            message = f"agent {agent_id} was revoked at {when.strftime('%Y-%m-%dT%H:%M:%SZ')}"
            ended += self.hub.end_revoked(agent_id, message)
        return ended

    async def tick(self) -> None:
        await self.run_once()
        self.resync_due()

    def resync_due(self) -> int:
        """Queue the full desired set for each local agent whose resync is due; how many.

        Each stream has its own schedule, the first one at a random point of the
        interval: with hundreds of agents a resync of all at once builds hundreds of
        full desired sets in one go and holds up every change queued behind them
        (seen in tests/bench/bench_multi_controller.py as a 37 s p99 change delay)."""
        if self.resync_interval <= 0:
            return 0
        now = time.monotonic()
        due = 0
        for stream in self.hub.streams():
            if stream.next_resync == 0.0:
                stream.next_resync = now + self.resync_interval * random.uniform(0.5, 1.0)
            elif now >= stream.next_resync:
                self.hub.notify_full(stream.agent_id)
                stream.next_resync = now + self.resync_interval
                due += 1
        return due

    async def wait_for_work(self) -> None:
        # An agent connecting is as good as a kick; both are cleared per pass.
        kick = asyncio.create_task(super().wait_for_work())
        connected = asyncio.create_task(self.hub.agent_connected.wait())
        try:
            await asyncio.wait({kick, connected}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            kick.cancel()
            connected.cancel()
        self.hub.agent_connected.clear()
