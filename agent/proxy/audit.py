"""The connection audit's outbox: visits the controller has not acknowledged yet.

The proxy reports each visit twice (`ConnectionVisit`: open, then closed); the agent
keeps the newest copy of each visit, one file `DIR/<visit_id>.pb` (0600), until the
controller acknowledges that very copy (`ConnectionVisitAck` naming its
`closed_at_ms`). A close replaces the open, so a visit opened and closed while the
controller was away is sent once, closed. The files let a visit outlive an agent
restart (and a SIGKILL: a copy is written to a temporary file and renamed into
place); they are not fsynced, since a flush per visit on the proxy's event loop would
cost more than the rare loss after a host crash, and the controller closes what a
dead proxy left open anyway.

Bounded: at most `MAX_VISITS` visits are held. Beyond that (a controller unreachable
for a long time, or one that never acks) new visits are dropped and counted, while
the close of a visit already held still replaces its open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from pathlib import Path

from google.protobuf.message import DecodeError
from studios.agent.v1 import agent_pb2 as pb

__all__ = ["MAX_VISITS", "VisitOutbox"]

log = logging.getLogger(__name__)

MAX_VISITS = 10_000
_VISIT_ID = re.compile(r"[0-9a-f]{32}")


class VisitOutbox:
    """The newest unacknowledged copy of each visit, in memory and on disk."""

    def __init__(self, directory: Path, *, limit: int = MAX_VISITS) -> None:
        self.directory = directory
        self.limit = limit
        # Visits dropped because the outbox was full (since the agent started).
        self.dropped = 0
        self._held: dict[str, pb.ConnectionVisit] = {}
        self._load()

    def _load(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(self.directory, 0o700)
        for path in self.directory.iterdir():
            if path.suffix != ".pb" or _VISIT_ID.fullmatch(path.stem) is None:
                # A temporary file of a write a kill interrupted, or not ours.
                path.unlink(missing_ok=True)
                continue
            visit = pb.ConnectionVisit()
            try:
                visit.ParseFromString(path.read_bytes())
            except (OSError, DecodeError):
                log.warning("connection audit: dropping unreadable %s", path)
                path.unlink(missing_ok=True)
                continue
            if visit.visit_id != path.stem:
                path.unlink(missing_ok=True)
                continue
            self._held[visit.visit_id] = visit
        if self._held:
            log.info("connection audit: %d visit(s) still to report", len(self._held))

    def __len__(self) -> int:
        return len(self._held)

    def get(self, visit_id: str) -> pb.ConnectionVisit | None:
        return self._held.get(visit_id)

    def add(self, visit: pb.ConnectionVisit) -> bool:
        """Hold `visit` (replacing an older copy of it); False when it was dropped."""
        if _VISIT_ID.fullmatch(visit.visit_id) is None:
            log.warning("connection audit: malformed visit id %r dropped", visit.visit_id)
            return False
        if visit.visit_id not in self._held and len(self._held) >= self.limit:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning(
                    "connection audit: %d visits wait for the controller (the most kept); "
                    "%d new visit(s) dropped so far",
                    len(self._held),
                    self.dropped,
                )
            return False
        self._held[visit.visit_id] = visit
        try:
            self._write(visit)
        except OSError as exc:
            # Still held in memory: only an agent restart would lose it now.
            log.warning("connection audit: visit %s not written: %s", visit.visit_id, exc)
        return True

    def _write(self, visit: pb.ConnectionVisit) -> None:
        path = self.directory / f"{visit.visit_id}.pb"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(visit.SerializeToString())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def pending(self) -> list[pb.ConnectionVisit]:
        """Every held visit, oldest first."""
        return sorted(self._held.values(), key=lambda v: (v.opened_at_ms, v.visit_id))

    def ack(self, visit_id: str, closed_at_ms: int) -> bool:
        """Drop the visit if its held copy is the acknowledged one; whether it was."""
        held = self._held.get(visit_id)
        if held is None or held.closed_at_ms != closed_at_ms:
            return False
        del self._held[visit_id]
        (self.directory / f"{visit_id}.pb").unlink(missing_ok=True)
        return True
