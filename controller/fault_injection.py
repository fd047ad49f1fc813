"""Fault injection for the crash tests; inert unless STUDIOS_TEST_FAULT is set.

Its own module so that the services and the agent link can both pause at a
named point without one importing the other.
"""

from __future__ import annotations

import asyncio
import logging
import os

__all__ = ["TEST_FAULTS", "pause_for_test"]

log = logging.getLogger(__name__)


class _TestFaults:
    """Fault injection for the crash tests only; inert unless STUDIOS_TEST_FAULT is set.

    The tests must hit windows too narrow to hit by timing (between a commit and
    the answer that follows it). `STUDIOS_TEST_FAULT` is a comma-separated list of
    `drop-acks=N` (the first N checkpoint acks of this process are not sent,
    the events being committed all the same) and `pause=POINT` (the handler
    reaching POINT waits forever, for the test to SIGKILL the process; points:
    create.committed, create.placed, start.committed, start.placed, stop.committed,
    delete.committed: "committed" right after the operation's transaction, "placed"
    after the session was placed and its agent told, both before the client's answer).
    """

    def __init__(self, spec: str) -> None:
        items = dict(item.strip().partition("=")[::2] for item in spec.split(",") if item.strip())
        self.acks_to_drop = int(items.get("drop-acks", "0") or 0)
        self.pause_at = items.get("pause", "")
        if spec:
            log.warning("TEST FAULTS ACTIVE (STUDIOS_TEST_FAULT=%s): not for production", spec)

    def drop_ack(self, session_id: str, key: str) -> bool:
        if self.acks_to_drop <= 0:
            return False
        self.acks_to_drop -= 1
        log.warning("test fault: dropped the ack of checkpoint %s/%s", session_id, key)
        return True


TEST_FAULTS = _TestFaults(os.environ.get("STUDIOS_TEST_FAULT", ""))


async def pause_for_test(point: str) -> None:
    """Wait forever at `point` when a test asked for it (see _TestFaults)."""
    if TEST_FAULTS.pause_at == point:
        log.warning("test fault: paused at %s", point)
        await asyncio.Event().wait()
