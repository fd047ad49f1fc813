"""The session lifecycle: statuses and the transitions between them.

Every change of a studio's status goes through `transition`, which also sets
the status message, stop reason and the time of the change (the API's
`statusInfo`). Checks for the REST operations (`check_start` ...) live here
too, so the rules of DESIGN.md "Session lifecycle" are in one place.
"""

from __future__ import annotations

import logging
from datetime import datetime
from enum import StrEnum

from controller.errors import BadRequest, Conflict, InvalidTransition
from controller.models import Checkpoint, Studio, utcnow

__all__ = [
    "ACTIVE",
    "Status",
    "StopReason",
    "agent_lost_message",
    "agent_revoked_message",
    "check_cancel",
    "check_delete",
    "check_extend_lifespan",
    "check_start",
    "check_stop",
    "check_update",
    "is_writing",
    "set_message",
    "transition",
]

log = logging.getLogger(__name__)


class Status(StrEnum):
    BUILDING = "building"
    BUILD_FAILED = "buildFailed"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERRORED = "errored"


class StopReason(StrEnum):
    """`statusInfo.stopReason` of the reference (only the ones this controller sets)."""

    LIFESPAN_EXPIRED = "LIFESPAN_EXPIRED"


# Statuses in which a session may hold resources on its agent (a build is one).
ACTIVE = frozenset({Status.BUILDING, Status.STARTING, Status.RUNNING, Status.STOPPING})

_ALLOWED: dict[Status, frozenset[Status]] = {
    # building -> stopped: a build the agent ended for a stop (a deleted studio).
    Status.BUILDING: frozenset(
        {Status.STARTING, Status.BUILD_FAILED, Status.ERRORED, Status.STOPPED}
    ),
    Status.BUILD_FAILED: frozenset({Status.BUILDING, Status.STARTING}),
    # starting -> stopping: a stop that the agent reports before "running"
    # (the API refuses a stop while starting, an agent may still do one).
    # starting -> building: the agent builds the studio's custom environment first
    # (the controller's start is `starting` until the agent says so).
    Status.STARTING: frozenset(
        {Status.BUILDING, Status.RUNNING, Status.STOPPING, Status.STOPPED, Status.ERRORED}
    ),
    Status.RUNNING: frozenset({Status.STOPPING, Status.STOPPED, Status.ERRORED}),
    Status.STOPPING: frozenset({Status.STOPPED, Status.ERRORED}),
    Status.STOPPED: frozenset({Status.BUILDING, Status.STARTING}),
    # errored -> stopped: a stop that failed (checkpoint not written) and
    # succeeded on a retry of the same generation.
    Status.ERRORED: frozenset({Status.BUILDING, Status.STARTING, Status.STOPPED}),
}


def can_transition(old: Status, new: Status) -> bool:
    return old == new or new in _ALLOWED[old]


def transition(
    studio: Studio,
    new: Status,
    *,
    message: str | None = None,
    stop_reason: str | None = None,
    now: datetime | None = None,
) -> bool:
    """Move `studio` to `new`; InvalidTransition if the lifecycle forbids it.

    A transition to the same status only updates the message. The stop
    reason of a stop in progress (e.g. LIFESPAN_EXPIRED) is kept through
    stopping -> stopped unless another is given; a start clears it. Returns
    True when anything changed.
    """
    old = Status(studio.status)
    if not can_transition(old, new):
        raise InvalidTransition(f"studio {studio.session_id} cannot go from {old} to {new}")
    if stop_reason is None and old in ACTIVE and new in (Status.STOPPING, Status.STOPPED):
        stop_reason = studio.stop_reason
    message = message or None
    if old == new and studio.status_message == message and studio.stop_reason == stop_reason:
        return False
    now = now or utcnow()
    if old != new:
        log.info("studio %s: %s -> %s (%s)", studio.session_id, old, new, message or "")
    studio.status = new.value
    studio.status_message = message
    studio.stop_reason = stop_reason
    studio.status_updated_at = now
    studio.last_updated = now
    return True


def agent_revoked_message(agent_id: str, when: datetime) -> str:
    """A session's message when its agent is revoked (controller.enrollment)."""
    return f"agent {agent_id} revoked at {when.strftime('%Y-%m-%dT%H:%M:%SZ')}"


def set_message(studio: Studio, message: str | None) -> bool:
    """Change only the status message (e.g. "agent disconnected")."""
    return transition(
        studio, Status(studio.status), message=message, stop_reason=studio.stop_reason
    )


def check_start(studio: Studio) -> None:
    status = Status(studio.status)
    if status not in (Status.STOPPED, Status.ERRORED, Status.BUILD_FAILED):
        raise Conflict(
            f"studio {studio.session_id} is {status}: only a stopped or errored studio can start"
        )


def check_stop(studio: Studio) -> bool:
    """Conflict while starting or building; False when there is nothing to stop."""
    status = Status(studio.status)
    if status in (Status.STARTING, Status.BUILDING):
        raise Conflict(
            f"studio {studio.session_id} is {status}: it can be stopped once it is running"
        )
    return status == Status.RUNNING


def check_cancel(studio: Studio) -> None:
    """POST /studios/{id}/cancel (an addition): only a start in progress can be cancelled."""
    status = Status(studio.status)
    if status not in (Status.STARTING, Status.BUILDING) or studio.desired_status != "running":
        raise Conflict(
            f"studio {studio.session_id} is {status}: only a starting or building studio's "
            "start can be cancelled (stop a running one)"
        )


def agent_lost_message(agent_id: str, last_seen: datetime | None) -> str:
    """A session's message when its agent has been gone past the grace period."""
    when = last_seen.strftime("%Y-%m-%dT%H:%M:%SZ") if last_seen is not None else "never"
    return f"agent lost: {agent_id} last seen {when}"


def check_delete(studio: Studio) -> None:
    status = Status(studio.status)
    if status in (Status.STARTING, Status.RUNNING, Status.STOPPING, Status.BUILDING):
        raise Conflict(f"studio {studio.session_id} is {status}: stop it before deleting it")


def check_update(studio: Studio) -> None:
    """PUT /studios/{id}: only a studio that is not running (nor on its way) can change."""
    status = Status(studio.status)
    if status in ACTIVE:
        raise Conflict(f"studio {studio.session_id} is {status}: stop it before editing it")


def check_extend_lifespan(studio: Studio) -> None:
    status = Status(studio.status)
    if status not in (Status.STARTING, Status.RUNNING):
        raise BadRequest(
            f"studio {studio.session_id} is {status}: only a running session's lifespan "
            "can be extended"
        )


def is_writing(studio: Studio, checkpoint: Checkpoint) -> bool:
    """True when `checkpoint` is the one the studio's current session is writing."""
    return Status(studio.status) in ACTIVE and checkpoint.generation == studio.generation
