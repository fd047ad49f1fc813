"""The registry of connected agent streams, and what is queued for each.

The hub holds no studio state. Code that changed a session's desired state
calls `notify(agent_id, {session_id})` *after* its transaction committed; the
stream's writer (in `controller.agent_service`) builds the message from the
database when it sends it. Because every message is built from the newest
committed state, no update can overtake a newer one.

Several controllers on one PostgreSQL (controller.notify): an agent's stream is
on one of them. `notify` also goes to the `publisher` (a NOTIFY with the agent id
and the session ids); the controller holding the stream gets it through `deliver`
and queues it as if it had made the change. Whether an agent is connected
anywhere is its lease in the database (`is_live`): the controller holding its
stream renews it while the agent talks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from controller.models import Agent, as_utc, utcnow

__all__ = ["FULL", "AgentHub", "AgentStream", "Publisher"]

log = logging.getLogger(__name__)

# Queue marker: send the complete desired set.
FULL = "full"

# Sends an update for an agent connected to another controller: (agent id, session ids,
# or None for the full desired set).
Publisher = Callable[[str, set[str] | None], None]


@dataclass(eq=False)
class AgentStream:
    """One live Connect stream of an agent."""

    agent_id: str
    compute_env_id: str
    connected_at: datetime = field(default_factory=utcnow)
    # Items: FULL, or a set of session ids to send (full=false).
    queue: asyncio.Queue[str | set[str]] = field(default_factory=asyncio.Queue)
    # Sessions the agent reported that are not placed on it: they get
    # DESIRED_STATUS_DELETED until the agent stops reporting them.
    foreign_sessions: set[str] = field(default_factory=set)
    # Set when a newer stream of the same agent replaced this one.
    replaced: asyncio.Event = field(default_factory=asyncio.Event)
    # Set (with the reason) when the agent was revoked: the stream ends, UNAUTHENTICATED.
    revoked: asyncio.Event = field(default_factory=asyncio.Event)
    revoked_message: str = ""
    # Hello.proxy_instance_id: the current run of the agent's connect proxy (an open
    # visit another run reports has ended with that run).
    proxy_instance_id: str = ""
    # time.monotonic() of the agent's last message: only a talking agent's lease is renewed.
    last_message: float = field(default_factory=time.monotonic)
    # When the periodic full resync is next due (controller.reconciler); 0: not scheduled.
    next_resync: float = 0.0
    # The controller serving this stream; "" when not known (an observation handler
    # then checks only `superseded`).
    controller_id: str = ""

    @property
    def superseded(self) -> bool:
        """A newer stream of the agent replaced this one, or the agent was revoked: what
        this stream still carries may predate what the newer one said, and is not applied
        (the agent says it all again on its next stream)."""
        return self.replaced.is_set() or self.revoked.is_set()


class AgentHub:
    def __init__(self) -> None:
        self._streams: dict[str, AgentStream] = {}
        # Set when several controllers share the database (controller.notify): updates
        # for agents connected elsewhere go there, and liveness is the database's lease.
        self.publisher: Publisher | None = None
        # Woken when an agent connects (the reconciler places pending starts).
        self.agent_connected = asyncio.Event()

    def register(self, agent_id: str, compute_env_id: str) -> AgentStream:
        """A new stream for `agent_id`; a previous one is told it is replaced."""
        old = self._streams.get(agent_id)
        if old is not None:
            log.info("agent %s opened a new stream: replacing the previous one", agent_id)
            old.replaced.set()
        stream = AgentStream(agent_id=agent_id, compute_env_id=compute_env_id)
        self._streams[agent_id] = stream
        self.agent_connected.set()
        return stream

    def unregister(self, stream: AgentStream) -> bool:
        """Forget `stream`; False if a newer stream already replaced it."""
        if self._streams.get(stream.agent_id) is stream:
            del self._streams[stream.agent_id]
            return True
        return False

    def end_revoked(self, agent_id: str, message: str) -> bool:
        """End the stream of a revoked agent (its handler refuses it); False if none."""
        stream = self._streams.get(agent_id)
        if stream is None or stream.revoked.is_set():
            return False
        log.warning("agent %s: ending its stream (%s)", agent_id, message)
        stream.revoked_message = message
        stream.revoked.set()
        return True

    def is_connected(self, agent_id: str) -> bool:
        """Connected to this controller."""
        return agent_id in self._streams

    @property
    def clustered(self) -> bool:
        return self.publisher is not None

    def is_live(self, agent: Agent) -> bool:
        """Connected to this controller, or (several controllers) to another one whose
        lease on the agent has not run out."""
        if agent.agent_id in self._streams:
            return True
        if not self.clustered or not agent.connected or agent.controller_id is None:
            return False
        expires = as_utc(agent.lease_expires_at)
        return expires is not None and expires > utcnow()

    def connected_agents(self, compute_env_id: str | None = None) -> list[str]:
        return [
            s.agent_id
            for s in self._streams.values()
            if compute_env_id is None or s.compute_env_id == compute_env_id
        ]

    def notify(self, agent_id: str | None, session_ids: Iterable[str]) -> None:
        """Queue a desired-state update of `session_ids` for the agent, if connected."""
        if agent_id is None:
            return
        stream = self._streams.get(agent_id)
        ids = set(session_ids)
        if not ids:
            return
        if stream is not None:
            stream.queue.put_nowait(ids)
        if self.publisher is not None:
            # Even with a stream here: it may be a dead one whose agent has reconnected to
            # another controller already (noticed here only at its keepalive timeout).
            # A second copy is harmless: desired state is idempotent.
            self.publisher(agent_id, ids)

    def deliver(self, agent_id: str, session_ids: set[str] | None) -> bool:
        """An update another controller published: queued if the agent's stream is here
        (None: the full desired set)."""
        stream = self._streams.get(agent_id)
        if stream is None:
            return False
        stream.queue.put_nowait(FULL if session_ids is None else set(session_ids))
        return True

    def notify_full(self, agent_id: str | None = None) -> None:
        """Queue the full desired set for one agent (or every connected agent)."""
        streams = (
            list(self._streams.values())
            if agent_id is None
            else [s for s in [self._streams.get(agent_id)] if s is not None]
        )
        for stream in streams:
            stream.queue.put_nowait(FULL)
        if agent_id is not None and not streams and self.publisher is not None:
            self.publisher(agent_id, None)

    def streams(self) -> list[AgentStream]:
        return list(self._streams.values())
