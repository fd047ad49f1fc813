"""Studio changes, as they are committed: what a long-poll (`GET /studios/{id}?wait=`) waits on.

`StudioEvents` is the whole interface: `changed(session_id)` says a studio's row changed
(called once the change is committed), `subscribe(session_id)` gives a `Subscription`
whose `wait()` returns when the next change comes. One controller feeds it from
its own commits (`watch_engine`: a SQLAlchemy listener on `Studio.status`, and on the
message and progress that go with a status, fired after the commit only); a controller
that shares its database with others can feed the same interface from PostgreSQL
notifications, so the long-poll code never knows where a change came from.

A waiter reads the studio again after each wake-up: an event carries no state, so a
missed or duplicated event costs at most one more read, never a wrong answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, object_session

from controller.models import Studio

__all__ = ["AnySubscription", "StudioEvents", "Subscription", "events_for", "watch_engine"]

_PENDING = "studio_events.changed"


class Subscription:
    """Changes of one studio from the moment of subscribing (none is lost between a read
    of the studio and the `wait` that follows it)."""

    def __init__(self, events: StudioEvents, session_id: str) -> None:
        self._events = events
        self.session_id = session_id
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()

    async def wait(self) -> None:
        """Returns when the studio changed since subscribing or the last `wait` (the
        caller bounds it: `asyncio.timeout`)."""
        await self._changed.wait()
        self._changed.clear()

    def close(self) -> None:
        self._events._drop(self)


class AnySubscription:
    """Changes of every studio from the moment of subscribing: the console's event stream
    (`controller.web_events`), which filters them by workspace and access itself."""

    def __init__(self, events: StudioEvents) -> None:
        self._events = events
        self._pending: set[str] = set()
        self._changed = asyncio.Event()

    def notify(self, session_id: str) -> None:
        self._pending.add(session_id)
        self._changed.set()

    async def wait(self) -> set[str]:
        """The session ids changed since subscribing or the last `wait` (at least one)."""
        await self._changed.wait()
        self._changed.clear()
        changed, self._pending = self._pending, set()
        return changed

    def close(self) -> None:
        self._events._any.discard(self)


class StudioEvents:
    """In-process fan-out of studio changes to the waiters of this controller."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = {}
        self._any: set[AnySubscription] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Told of the studios this process's commits changed, after the commit: the
        #: cluster bus (controller.notify) passes them on to the other controllers,
        #: whose waiters (long-polls, the console's event streams) then wake too.
        self.on_committed: Callable[[set[str]], None] | None = None

    @contextlib.contextmanager
    def subscribe(self, session_id: str) -> Iterator[Subscription]:
        self._loop = asyncio.get_running_loop()
        sub = Subscription(self, session_id)
        self._subscribers.setdefault(session_id, set()).add(sub)
        try:
            yield sub
        finally:
            sub.close()

    @contextlib.contextmanager
    def subscribe_all(self) -> Iterator[AnySubscription]:
        """Every studio's changes (see `AnySubscription`)."""
        self._loop = asyncio.get_running_loop()
        sub = AnySubscription(self)
        self._any.add(sub)
        try:
            yield sub
        finally:
            sub.close()

    def changed(self, session_id: str) -> None:
        """Wake the waiters of `session_id`; safe from any thread (a feed of notifications
        may run elsewhere), on the loop the waiters run on."""
        loop = self._loop
        if loop is None or not (self._subscribers.get(session_id) or self._any):
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake(session_id)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._wake, session_id)

    def waiting(self, session_id: str | None = None) -> int:
        """How many subscriptions are open (of one studio): tests and metrics."""
        if session_id is not None:
            return len(self._subscribers.get(session_id, ()))
        return sum(len(s) for s in self._subscribers.values())

    def _wake(self, session_id: str) -> None:
        for sub in list(self._subscribers.get(session_id, ())):
            sub.notify()
        for any_sub in list(self._any):
            any_sub.notify(session_id)

    def _drop(self, sub: Subscription) -> None:
        subs = self._subscribers.get(sub.session_id)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subscribers[sub.session_id]


# ------------------------------------------------------------ fed from this process's commits

# Which controller's events an engine's commits feed (several controllers may share one
# process in tests, each with its own engine).
_WATCHED: weakref.WeakKeyDictionary[Engine, StudioEvents] = weakref.WeakKeyDictionary()
_installed = False


def events_for(engine: Engine) -> StudioEvents:
    """The StudioEvents that `engine`'s commits feed (made and watched on first use)."""
    events = _WATCHED.get(engine)
    if events is None:
        events = StudioEvents()
        watch_engine(engine, events)
    return events


def watch_engine(engine: Engine, events: StudioEvents) -> None:
    global _installed
    _WATCHED[engine] = events
    if not _installed:
        # Status, message and progress: what a waiter may be waiting to see change; who is
        # connected and deletion: what the console shows live.
        for attribute in (
            Studio.status,
            Studio.status_message,
            Studio.progress,
            Studio.active_connections,
            Studio.deleted,
        ):
            event.listen(attribute, "set", _on_set)
        # A new studio is not in a session yet when its constructor sets its attributes.
        event.listen(Session, "before_flush", _on_flush)
        event.listen(Session, "after_commit", _on_commit)
        event.listen(Session, "after_rollback", _on_rollback)
        _installed = True


def _events_of(session: Session) -> StudioEvents | None:
    bind = session.bind
    engine = bind if isinstance(bind, Engine) else getattr(bind, "engine", None)
    return _WATCHED.get(engine) if isinstance(engine, Engine) else None


def _on_set(studio: Studio, _value: Any, _old: Any, _initiator: Any) -> None:
    session = object_session(studio)
    if session is None or _events_of(session) is None:
        return
    session.info.setdefault(_PENDING, set()).add(studio.session_id)


def _on_flush(session: Session, _context: Any, _instances: Any) -> None:
    if _events_of(session) is None:
        return
    new = [obj.session_id for obj in session.new if isinstance(obj, Studio)]
    if new:
        session.info.setdefault(_PENDING, set()).update(new)


def _on_commit(session: Session) -> None:
    changed = session.info.pop(_PENDING, None)
    if not changed:
        return
    events = _events_of(session)
    if events is None:
        return
    for session_id in changed:
        events.changed(session_id)
    if events.on_committed is not None:
        events.on_committed(set(changed))


def _on_rollback(session: Session) -> None:
    session.info.pop(_PENDING, None)
