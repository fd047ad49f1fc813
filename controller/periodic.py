"""A background pass that runs every `interval` seconds, or sooner when kicked.

The reconciler and the checkpoint collector both work this way: a failed pass
is logged and retried at the next tick rather than ending the task, and a
`kick()` (a studio created, an agent connected, a studio deleted) wakes the
loop at once instead of waiting out the interval.
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

    @abstractmethod
    async def tick(self) -> None:
        """One pass; exceptions are logged and the loop goes on."""

    async def wait_for_work(self) -> None:
        """Returns when a pass is wanted before the interval is up."""
        await self._kick.wait()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def kick(self) -> None:
        self._kick.set()

    async def _loop(self) -> None:
        log = logging.getLogger(type(self).__module__)
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed; retrying in %.0f s", self.name, self.interval)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self.wait_for_work()
            self._kick.clear()
