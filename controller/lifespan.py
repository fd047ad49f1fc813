"""Session lifespans: how long a run may last, and stopping the ones past it.

A studio's lifespan is `configuration.lifespanHours` when set (> 0), else the
workspace's Studios setting `lifespanHours`; 0 means unlimited. It counts from
the start of the current run (`lastStarted`). `POST /studios/{id}/lifespan`
adds the base lifespan once more to the current run (`lifespan_extra_hours`,
reset at every start); `effectiveLifespanHours` is base + extensions.

`LifespanEnforcer.enforce_once` (a pass of the reconciler) stops every
starting or running session past its lifespan, with `stopReason:
LIFESPAN_EXPIRED`.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select

from controller import lifecycle
from controller.agent_hub import AgentHub
from controller.db import Database
from controller.lifecycle import Status, StopReason
from controller.models import Studio, Workspace, as_utc, utcnow

__all__ = ["LifespanEnforcer", "base_lifespan_hours", "deadline", "effective_lifespan_hours"]

log = logging.getLogger(__name__)


def base_lifespan_hours(studio: Studio, workspace: Workspace | None) -> int:
    own = int((studio.configuration or {}).get("lifespanHours") or 0)
    if own > 0:
        return own
    return int(workspace.lifespan_hours or 0) if workspace is not None else 0


def effective_lifespan_hours(studio: Studio, workspace: Workspace | None) -> int:
    base = base_lifespan_hours(studio, workspace)
    return base + int(studio.lifespan_extra_hours or 0) if base > 0 else 0


def deadline(studio: Studio, workspace: Workspace | None) -> datetime | None:
    """When the current run must stop; None for unlimited or not started."""
    hours = effective_lifespan_hours(studio, workspace)
    started = as_utc(studio.last_started)
    if hours <= 0 or started is None:
        return None
    return started + timedelta(hours=hours)


class LifespanEnforcer:
    def __init__(self, db: Database, hub: AgentHub) -> None:
        self.db = db
        self.hub = hub

    async def enforce_once(self, now: datetime | None = None) -> list[str]:
        """Stop the sessions past their lifespan; their ids."""
        now = now or utcnow()
        stopped: list[tuple[str | None, str]] = []
        async with self.db.transaction() as session:
            rows = (
                await session.execute(
                    select(Studio, Workspace)
                    .join(Workspace, Workspace.id == Studio.workspace_id)
                    .where(
                        Studio.status.in_([Status.STARTING.value, Status.RUNNING.value]),
                        Studio.desired_status == "running",
                        Studio.deleted.is_(False),
                    )
                    .with_for_update()
                )
            ).all()
            for studio, workspace in rows:
                end = deadline(studio, workspace)
                if end is None or end > now:
                    continue
                hours = effective_lifespan_hours(studio, workspace)
                studio.desired_status = "stopped"
                studio.progress = [
                    {
                        "message": "stopping the session: its lifespan has expired",
                        "status": "in-progress",
                        "warnings": [],
                    }
                ]
                lifecycle.transition(
                    studio,
                    Status.STOPPING,
                    message=f"lifespan of {hours} h expired",
                    stop_reason=StopReason.LIFESPAN_EXPIRED.value,
                    now=now,
                )
                stopped.append((studio.agent_id, studio.session_id))
        for agent_id, session_id in stopped:
            log.info("studio %s: lifespan expired, stopping", session_id)
            self.hub.notify(agent_id, [session_id])
        return [sid for _, sid in stopped]
