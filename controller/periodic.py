"""A background pass that runs every `interval` seconds, or sooner when kicked.

The reconciler and the checkpoint collector both work this way: a failed pass
is logged and retried at the next tick rather than ending the task, and a
`kick()` (a studio created, an agent connected, a studio deleted) wakes the
loop at once instead of waiting out the interval.

`stop()` lets a pass in progress finish (up to a grace period) before it
cancels: a pass cancelled inside a SQLite transaction (BEGIN IMMEDIATE) can
keep the write lock until its connection is collected, and whatever writes
next at shutdown (an agent's disconnect) then waits out the busy timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod

__all__ = ["PeriodicPass"]


class PeriodicPass(ABC):
    #: Task name, and the subject of the log line when a pass fails.
    name = "periodic pass"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        self._stopping = False

    @abstractmethod
    async def tick(self) -> None:
        """One pass; exceptions are logged and the loop goes on."""

    async def wait_for_work(self) -> None:
        """Returns when a pass is wanted before the interval is up."""
        await self._kick.wait()

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self, grace_s: float = 10.0) -> None:
        if self._task is None:
            return
        self._stopping = True
        self._kick.set()
        _, running = await asyncio.wait({self._task}, timeout=grace_s)
        for task in running:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def kick(self) -> None:
        self._kick.set()

    async def _loop(self) -> None:
        log = logging.getLogger(type(self).__module__)
        while not self._stopping:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed; retrying in %.0f s", self.name, self.interval)
            if self._stopping:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self.wait_for_work()
            self._kick.clear()
