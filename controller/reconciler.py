"""The reconciler: a periodic pass that drives observed state toward desired.

Each pass places pending starts and stops sessions past their lifespan; every
`resync_interval` it also queues the full desired set for every connected
agent (messages are idempotent, so a lost one is repaired without anyone
noticing). An agent connecting wakes it early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from controller.agent_hub import AgentHub
from controller.lifespan import LifespanEnforcer
from controller.placement import Placer

__all__ = ["Reconciler"]

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self,
        placer: Placer,
        hub: AgentHub,
        *,
        interval: float,
        resync_interval: float,
        lifespans: LifespanEnforcer | None = None,
        lifespan_interval: float = 30.0,
    ) -> None:
        self.placer = placer
        self.lifespans = lifespans
        self.lifespan_interval = lifespan_interval
        self._last_lifespan_check = float("-inf")
        self.hub = hub
        self.interval = interval
        self.resync_interval = resync_interval
        self._task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reconciler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def kick(self) -> None:
        self._kick.set()

    async def run_once(self) -> None:
        await self.placer.place_pending()
        # Lifespans are hours long: checking every `lifespan_interval` is plenty.
        if (
            self.lifespans is not None
            and time.monotonic() - self._last_lifespan_check >= self.lifespan_interval
        ):
            self._last_lifespan_check = time.monotonic()
            await self.lifespans.enforce_once()

    async def _run(self) -> None:
        last_resync = time.monotonic()
        while True:
            try:
                await self.run_once()
                if time.monotonic() - last_resync >= self.resync_interval:
                    self.hub.notify_full()
                    last_resync = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconciler pass failed; retrying in %.0f s", self.interval)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wait_for_kick()
            self._kick.clear()
            self.hub.agent_connected.clear()

    async def _wait_for_kick(self) -> None:
        kick = asyncio.create_task(self._kick.wait())
        connected = asyncio.create_task(self.hub.agent_connected.wait())
        try:
            await asyncio.wait({kick, connected}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            kick.cancel()
            connected.cancel()
