"""Changes made by one controller reach agents connected to another (PostgreSQL).

Every controller LISTENs on one channel over a dedicated connection (not one of the
pool's: a listening connection must stay open). A controller that committed a change
for an agent whose stream is elsewhere NOTIFYs the agent id and the session ids
(`publish`, through `AgentHub.publisher`); the controller holding the stream queues the
desired state for them (`AgentHub.deliver`), built from the database when it is sent,
so a notification carries no state and none can overtake a newer one. NOTIFY is
delivered only to sessions listening at the time, in commit order: a controller that
lost its connection missed what was said meanwhile, so after every (re)connect each of
its agents gets the full desired set again. The periodic full resync remains the
safety net (`--resync-interval-seconds`).

Payload: JSON `{"a": agent id, "s": [session ids]}`, or `{"a": agent id, "f": 1}` for
the full set; long lists are split below PostgreSQL's 8000-byte payload limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
from collections.abc import Callable
from typing import Any

import asyncpg
from sqlalchemy import make_url

from controller.agent_hub import AgentHub
from controller.studio_events import StudioEvents

__all__ = ["CHANNEL", "STUDIO_CHANNEL", "ClusterBus", "asyncpg_dsn", "decode", "encode"]

log = logging.getLogger(__name__)

CHANNEL = "studios_agent_updates"
# The studios a controller's commits changed (session ids, comma-separated): the other
# controllers wake their waiters (long-polls, the console's event streams) for them.
STUDIO_CHANNEL = "studios_studio_changes"
# NOTIFY payloads are limited to 8000 bytes: 8-character ids and their commas.
_STUDIOS_PER_PAYLOAD = 800
# Session ids are 8 characters: 500 a message stays far below 8000 bytes.
_IDS_PER_MESSAGE = 500
_HEALTH_INTERVAL_S = 10.0
_START_TIMEOUT_S = 30.0


def asyncpg_dsn(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as asyncpg takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def encode(agent_id: str, session_ids: set[str] | None) -> list[str]:
    if session_ids is None:
        return [json.dumps({"a": agent_id, "f": 1}, separators=(",", ":"))]
    ids = sorted(session_ids)
    return [
        json.dumps({"a": agent_id, "s": ids[i : i + _IDS_PER_MESSAGE]}, separators=(",", ":"))
        for i in range(0, len(ids), _IDS_PER_MESSAGE)
    ]


def decode(payload: str) -> tuple[str, set[str] | None] | None:
    """(agent id, session ids or None for the full set); None when malformed."""
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("a"), str):
        return None
    if data.get("f"):
        return data["a"], None
    ids = data.get("s")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return None
    return data["a"], set(ids)


class ClusterBus:
    """This controller's LISTEN connection and its NOTIFY sender."""

    def __init__(
        self, database_url: str, hub: AgentHub, events: StudioEvents | None = None
    ) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._hub = hub
        self._events = events
        # (channel, payload) to NOTIFY.
        self._outbox: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._pid = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        # Counters for tests and the benchmark.
        self.published = 0
        self.delivered = 0
        self.reconnects = 0
        #: Called after every (re)connect (tests; the hub resync is done here already).
        self.on_connected: Callable[[], None] | None = None

    async def start(self) -> None:
        """Connect and listen; returns once listening (raises after 30 s)."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="cluster-bus")
        waiter = asyncio.create_task(self._connected.wait())
        done, _ = await asyncio.wait({waiter, self._task}, timeout=_START_TIMEOUT_S)
        if waiter not in done:
            waiter.cancel()
            raise TimeoutError(
                f"cannot LISTEN on the database within {_START_TIMEOUT_S:.0f} s: is it reachable?"
            )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def publish(self, agent_id: str, session_ids: set[str] | None) -> None:
        for payload in encode(agent_id, session_ids):
            self._outbox.put_nowait((CHANNEL, payload))

    def publish_studios(self, session_ids: set[str]) -> None:
        """Tell the other controllers these studios changed (StudioEvents.on_committed,
        called where the commit ran: on the loop, or in a worker thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                on_loop = asyncio.get_running_loop() is loop
            except RuntimeError:
                on_loop = False
            if not on_loop:
                loop.call_soon_threadsafe(self.publish_studios, session_ids)
                return
        ids = sorted(session_ids)
        for i in range(0, len(ids), _STUDIOS_PER_PAYLOAD):
            self._outbox.put_nowait((STUDIO_CHANNEL, ",".join(ids[i : i + _STUDIOS_PER_PAYLOAD])))

    def _on_studio_notification(self, _conn: Any, pid: int, _channel: str, payload: str) -> None:
        if pid == self._pid or self._events is None:
            return  # our own commits woke our waiters already
        for session_id in payload.split(","):
            if session_id:
                self._events.changed(session_id)

    def _on_notification(self, _conn: Any, pid: int, _channel: str, payload: str) -> None:
        if pid == self._pid:
            return  # our own: the stream was not here when it was sent
        decoded = decode(payload)
        if decoded is None:
            log.warning("ignored a malformed notification on %s: %.200r", CHANNEL, payload)
            return
        if self._hub.deliver(*decoded):
            self.delivered += 1

    async def _run(self) -> None:
        attempt = 0
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=10)
                lost = asyncio.Event()
                conn.add_termination_listener(functools.partial(_set_event, lost))
                await conn.add_listener(CHANNEL, self._on_notification)
                await conn.add_listener(STUDIO_CHANNEL, self._on_studio_notification)
                self._pid = conn.get_server_pid()
                if self._connected.is_set():
                    self.reconnects += 1
                    log.info("listening on %s again: resending every agent's desired set", CHANNEL)
                    # What was notified while we were not listening is lost.
                    self._hub.notify_full()
                self._connected.set()
                attempt = 0
                if self.on_connected is not None:
                    self.on_connected()
                await self._serve(conn, lost)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                delay = min(30.0, 0.5 * 2**attempt) * random.uniform(0.5, 1.0)
                attempt = min(attempt + 1, 10)
                log.warning(
                    "database notifications (LISTEN %s): %s; reconnecting in %.1f s",
                    CHANNEL,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 5)

    async def _serve(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Send what is queued; check the connection now and then (a half-open TCP
        connection would otherwise never tell us it is gone)."""
        while not lost.is_set():
            try:
                first = await asyncio.wait_for(self._outbox.get(), _HEALTH_INTERVAL_S)
            except TimeoutError:
                await conn.execute("SELECT 1", timeout=10)
                continue
            batch = [first]
            while not self._outbox.empty() and len(batch) < 1000:
                batch.append(self._outbox.get_nowait())
            try:
                await conn.executemany("SELECT pg_notify($1, $2)", batch, timeout=10)
            except BaseException:
                # Not sent: again on the next connection (a copy is harmless).
                for payload in batch:
                    self._outbox.put_nowait(payload)
                raise
            self.published += len(batch)
        raise ConnectionError("the LISTEN connection was closed")


def _set_event(event: asyncio.Event, _conn: object) -> None:
    event.set()
