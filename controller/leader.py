"""Background jobs run once across controllers: job leases in the database.

A periodic job (the reconciler's shared pass, lifespans, checkpoint GC, and any job
added later) runs a pass only on the controller holding the job's lease
(`job_leases`, one row per job name). The holder renews it while a pass runs and after
each pass, so it keeps the job while it lives; another controller takes the job once
the lease has run out (its holder died or stalled), at its next pass, and the row's
`generation` goes up. A pass whose lease cannot be renewed in time is cancelled, so
two controllers never run the same job at once. `passes` counts the passes run.

With SQLite there is one controller: every pass runs and no lease is written.

Use: decorate the pass (an async method) of an object that has a `leader` attribute
(a `Leader`, or None for "always run", which is also what an object without one gets):

    class LostAgents(PeriodicPass):
        leader: Leader | None = None

        @run_once_across_controllers("lost-agents")
        async def tick(self) -> None: ...

and set `job.leader = controller.leader` where the controller builds the job
(controller.app). Lease times are the controllers' clocks (keep them in NTP sync, as
certificates need anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import text

from controller.db import Database
from controller.models import utcnow

__all__ = ["Leader", "run_once_across_controllers"]

log = logging.getLogger(__name__)

# Clock skew and database latency allowed for when judging whether a lease still holds.
_MARGIN_S = 1.0

_P = ParamSpec("_P")
_S = TypeVar("_S")
_T = TypeVar("_T")

_TAKE = text(
    """
    INSERT INTO job_leases (name, holder, expires_at, generation, passes)
    VALUES (:name, :me, :expires, 1, 0)
    ON CONFLICT (name) DO UPDATE
       SET holder = :me,
           expires_at = :expires,
           generation = job_leases.generation
               + CASE WHEN job_leases.holder = :me THEN 0 ELSE 1 END
     WHERE job_leases.holder = :me OR job_leases.expires_at < :now
    RETURNING generation
    """
)
_RENEW = text(
    "UPDATE job_leases SET expires_at = :expires, passes = passes + :done "
    "WHERE name = :name AND holder = :me AND expires_at >= :now"
)


class Leader:
    """This controller's side of the job leases."""

    def __init__(self, db: Database, controller_id: str, *, lease_seconds: float = 15.0) -> None:
        self.db = db
        self.controller_id = controller_id
        self.lease = timedelta(seconds=lease_seconds)
        # The generation of each lease this controller holds (log lines on changes).
        self._held: dict[str, int] = {}
        # Passes this controller ran, per job (tests, the benchmark).
        self.passes: dict[str, int] = {}

    async def _take(self, name: str) -> bool:
        now = utcnow()
        async with self.db.transaction() as session:
            params = {"name": name, "me": self.controller_id, "now": now}
            generation = await session.scalar(_TAKE, {**params, "expires": now + self.lease})
        if generation is None:
            if self._held.pop(name, None) is not None:
                log.warning("job %s: another controller holds it now", name)
            return False
        if self._held.get(name) != generation:
            log.info(
                "job %s: this controller (%s) runs it now (lease generation %d)",
                name,
                self.controller_id,
                generation,
            )
        self._held[name] = int(generation)
        return True

    async def _renew(self, name: str, *, done: int = 0) -> bool:
        now = utcnow()
        async with self.db.transaction() as session:
            result = await session.execute(
                _RENEW,
                {
                    "name": name,
                    "me": self.controller_id,
                    "expires": now + self.lease,
                    "now": now,
                    "done": done,
                },
            )
        return bool(getattr(result, "rowcount", 0))

    async def run(self, name: str, work: Callable[[], Awaitable[_T]]) -> tuple[bool, _T | None]:
        """(True, result) when this controller held job `name` and ran `work`; (False,
        None) when another controller holds it. The lease is renewed while `work` runs;
        `work` is cancelled if that fails (another controller may take the job)."""
        if self.db.is_sqlite:
            self.passes[name] = self.passes.get(name, 0) + 1
            return True, await work()
        if not await self._take(name):
            return False, None
        task = asyncio.ensure_future(work())
        keeper = asyncio.create_task(self._keep(name, task))
        try:
            result = await task
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        self.passes[name] = self.passes.get(name, 0) + 1
        try:
            await self._renew(name, done=1)
        except Exception:
            log.exception("job %s: recording the pass failed", name)
        return True, result

    async def _keep(self, name: str, task: asyncio.Future[Any]) -> None:
        """Renew the lease every third of it while `task` runs. A renewal that fails or
        is slow (a busy database) is tried again while the lease still holds; once it may
        have run out, another controller may take the job, so `task` is cancelled."""
        lease_s = self.lease.total_seconds()
        margin = min(_MARGIN_S, lease_s / 4)
        # Conservative: the lease was written no earlier than this, so it holds until then.
        expires = time.monotonic() + lease_s - margin
        while True:
            await asyncio.sleep(min(lease_s / 3, max(0.0, expires - time.monotonic()) / 2))
            attempt = time.monotonic()
            why = ""
            try:
                held = await asyncio.wait_for(
                    self._renew(name), max(0.05, expires - time.monotonic())
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                held, why = False, f"{type(exc).__name__}: {exc}".rstrip(": ")
            if held:
                expires = attempt + lease_s - margin
                continue
            if why and time.monotonic() < expires:
                log.warning("job %s: renewing its lease failed (%s); trying again", name, why)
                continue
            self._held.pop(name, None)
            log.error(
                "job %s: the lease %s during a pass; the pass is cancelled",
                name,
                f"could not be renewed in time ({why})" if why else "was taken over",
            )
            task.cancel()
            return

    async def release(self) -> None:
        """Give up every lease held (a clean stop: another controller takes over now)."""
        if self.db.is_sqlite or not self._held:
            return
        names = list(self._held)
        self._held.clear()
        try:
            async with self.db.transaction() as session:
                for name in names:
                    await session.execute(
                        text(
                            "UPDATE job_leases SET expires_at = :past "
                            "WHERE name = :name AND holder = :me"
                        ),
                        {"name": name, "me": self.controller_id, "past": utcnow() - self.lease},
                    )
        except Exception:
            log.exception("releasing the job leases failed; they run out by themselves")


def run_once_across_controllers(
    name: str,
) -> Callable[
    [Callable[Concatenate[_S, _P], Coroutine[Any, Any, None]]],
    Callable[Concatenate[_S, _P], Coroutine[Any, Any, None]],
]:
    """Decorate a job's pass: it runs only on the controller holding the lease `name`
    (see the module docstring); the object's `leader` attribute decides."""

    def wrap(
        method: Callable[Concatenate[_S, _P], Coroutine[Any, Any, None]],
    ) -> Callable[Concatenate[_S, _P], Coroutine[Any, Any, None]]:
        @functools.wraps(method)
        async def gated(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> None:
            leader = getattr(self, "leader", None)
            if not isinstance(leader, Leader):
                await method(self, *args, **kwargs)
                return
            await leader.run(name, lambda: method(self, *args, **kwargs))

        return gated

    return wrap
