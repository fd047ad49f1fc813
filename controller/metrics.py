"""The controller's Prometheus metrics (issue 16, "Operable daemons").

Every controller has a registry of its own (tests run several in one process; the
library's global registry would mix them up). What the database holds is counted when
scraped, not kept in step with every write: `scrape` first runs two GROUP BY queries
(studios per status, checkpoints per status with their bytes), then renders. What only
happens as an event is recorded as it happens:

- request latencies: an aiohttp middleware, outermost, labelled with the route's
  canonical pattern (`/studios/{sessionId}`), never the raw path, so ids do not make
  new series; a request no route matched is `route="unmatched"`;
- start latency (time spent `starting` until `running`) and stop latency (`stopping`
  until `stopped`): every status change goes through `lifecycle.transition`, which sets
  `Studio.status` and then `status_updated_at`; a SQLAlchemy attribute listener sees
  the change with the time the studio entered its old status, keeps it in the ORM
  session and records it once the transaction commits (a rolled-back change is never
  counted). The listener is process-wide; each controller's engine finds its own
  metrics, so two controllers in one process do not count each other's studios.

Pool figures come from SQLAlchemy's queue pool (SQLite files and PostgreSQL both use
one); a pool without those figures exports none.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import event, func, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, object_session
from sqlalchemy.pool import QueuePool

from controller.agent_hub import AgentHub
from controller.db import Database
from controller.lifecycle import Status
from controller.models import Checkpoint, Studio, as_utc, utcnow

__all__ = ["ControllerMetrics"]

log = logging.getLogger(__name__)

# Starts restore checkpoints and pull images; stops write the final checkpoint: seconds
# to minutes, with a tail worth seeing.
_LIFECYCLE_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_CHECKPOINT_STATUSES = ("empty", "interim", "finalized", "invalid")
_PENDING = "studios.metrics.transitions"


class ControllerMetrics:
    """The metrics of one controller: its registry, middleware and database figures."""

    def __init__(self, db: Database, hub: AgentHub) -> None:
        self.db = db
        self.hub = hub
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "studios_controller_http_request_duration_seconds",
            "REST API request latency, by method and route pattern",
            ["method", "route"],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.responses = Counter(
            "studios_controller_http_responses",
            "REST API answers, by method, route pattern and status code",
            ["method", "route", "code"],
            registry=self.registry,
        )
        self.start_seconds = Histogram(
            "studios_controller_start_duration_seconds",
            "Time studios spent starting before they ran (start requested to running)",
            buckets=_LIFECYCLE_BUCKETS,
            registry=self.registry,
        )
        self.stop_seconds = Histogram(
            "studios_controller_stop_duration_seconds",
            "Time studios spent stopping (stop requested to stopped, final checkpoint included)",
            buckets=_LIFECYCLE_BUCKETS,
            registry=self.registry,
        )
        self.transitions = Counter(
            "studios_controller_status_transitions",
            "Studio status changes committed, by old and new status",
            ["from_status", "to_status"],
            registry=self.registry,
        )
        self._snapshot = _Snapshot()
        self.registry.register(_StateCollector(self))
        _watch(db.engine.sync_engine, self)

    # ------------------------------------------------------------ scraping

    async def refresh(self) -> None:
        """Count what the database holds now (two GROUP BY queries)."""
        snapshot = _Snapshot()
        try:
            async with self.db.transaction() as session:
                rows = await session.execute(
                    select(Studio.status, func.count())
                    .where(Studio.deleted.is_(False))
                    .group_by(Studio.status)
                )
                snapshot.studios = {str(status): int(n) for status, n in rows}
                checkpoint_rows = await session.execute(
                    select(
                        Checkpoint.status,
                        func.count(),
                        func.coalesce(func.sum(Checkpoint.size_bytes), 0),
                    )
                    .join(Studio, Studio.session_id == Checkpoint.session_id)
                    .where(Studio.deleted.is_(False))
                    .group_by(Checkpoint.status)
                )
                snapshot.checkpoints = {
                    str(status): (int(n), int(size)) for status, n, size in checkpoint_rows
                }
            snapshot.database_ok = True
        except Exception as exc:
            # The scrape still answers (streams, requests, the pool); the database's
            # figures are left out and database_up says why they are missing.
            log.warning("metrics: counting studios failed: %s: %s", type(exc).__name__, exc)
        self._snapshot = snapshot

    async def scrape(self) -> bytes:
        """The text exposition, with the database's figures counted now."""
        await self.refresh()
        return generate_latest(self.registry)

    # ------------------------------------------------------------ requests

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        code = 500
        try:
            response = await handler(request)
            code = response.status
            return response
        except web.HTTPException as exc:
            code = exc.status
            raise
        finally:
            route = _route_pattern(request)
            self.request_seconds.labels(request.method, route).observe(
                time.perf_counter() - started
            )
            self.responses.labels(request.method, route, str(code)).inc()

    def install(self, app: web.Application) -> None:
        """Time every request of `app`: outermost, so refusals and mapped errors count."""
        app.middlewares.insert(0, self.middleware)

    # ------------------------------------------------------------ transitions

    def observe_transition(self, old: str, new: str, seconds: float) -> None:
        self.transitions.labels(old, new).inc()
        if old == Status.STARTING and new == Status.RUNNING:
            self.start_seconds.observe(seconds)
        elif old == Status.STOPPING and new == Status.STOPPED:
            self.stop_seconds.observe(seconds)

    def close(self) -> None:
        _unwatch(self.db.engine.sync_engine)


class _Snapshot:
    def __init__(self) -> None:
        self.database_ok = False
        self.studios: dict[str, int] = {}
        self.checkpoints: dict[str, tuple[int, int]] = {}


def _route_pattern(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


class _StateCollector(Collector):
    """What is read at scrape time: database counts, agent streams, the pool."""

    def __init__(self, metrics: ControllerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        snap = m._snapshot
        up = GaugeMetricFamily(
            "studios_controller_database_up",
            "Whether the last scrape could count studios in the database (1) or not (0)",
        )
        up.add_metric([], 1.0 if snap.database_ok else 0.0)
        yield up
        if snap.database_ok:
            studios = GaugeMetricFamily(
                "studios_controller_studios",
                "Studios (not deleted) by status",
                labels=["status"],
            )
            for status in [s.value for s in Status] + sorted(
                set(snap.studios) - {s.value for s in Status}
            ):
                studios.add_metric([status], float(snap.studios.get(status, 0)))
            yield studios
            count = GaugeMetricFamily(
                "studios_controller_checkpoints",
                "Checkpoints of studios not deleted, by status",
                labels=["status"],
            )
            size = GaugeMetricFamily(
                "studios_controller_checkpoint_size_bytes",
                "Sum of the sizes of those checkpoints as their agents reported them "
                "(before deduplication)",
                labels=["status"],
            )
            for status in sorted(set(_CHECKPOINT_STATUSES) | set(snap.checkpoints)):
                n, total = snap.checkpoints.get(status, (0, 0))
                count.add_metric([status], float(n))
                size.add_metric([status], float(total))
            yield count
            yield size
        streams = GaugeMetricFamily(
            "studios_controller_agent_streams",
            "Agent streams connected to this controller",
        )
        streams.add_metric([], float(len(m.hub.streams())))
        yield streams
        yield from _pool_metrics(m.db.engine.sync_engine)


def _pool_metrics(engine: Engine) -> Iterable[Metric]:
    pool = engine.pool
    if not isinstance(pool, QueuePool):
        return
    size = GaugeMetricFamily(
        "studios_controller_db_pool_size", "Connections the database pool keeps open at most"
    )
    size.add_metric([], float(pool.size()))
    yield size
    connections = GaugeMetricFamily(
        "studios_controller_db_pool_connections",
        "Database pool connections: checked out (in use), checked in (idle), overflow "
        "(opened beyond the pool's size)",
        labels=["state"],
    )
    connections.add_metric(["checked_out"], float(pool.checkedout()))
    connections.add_metric(["checked_in"], float(pool.checkedin()))
    connections.add_metric(["overflow"], float(max(0, pool.overflow())))
    yield connections


# ------------------------------------------------------------ the transition listener

# Which controller's metrics an engine's sessions report to.
_WATCHED: weakref.WeakKeyDictionary[Engine, ControllerMetrics] = weakref.WeakKeyDictionary()
_installed = False


def _watch(engine: Engine, metrics: ControllerMetrics) -> None:
    global _installed
    _WATCHED[engine] = metrics
    if not _installed:
        event.listen(Studio.status, "set", _on_status_set, active_history=True)
        event.listen(Session, "after_commit", _on_commit)
        event.listen(Session, "after_rollback", _on_rollback)
        _installed = True


def _unwatch(engine: Engine) -> None:
    _WATCHED.pop(engine, None)


def _metrics_of(session: Session) -> ControllerMetrics | None:
    bind = session.bind
    engine = bind if isinstance(bind, Engine) else getattr(bind, "engine", None)
    return _WATCHED.get(engine) if isinstance(engine, Engine) else None


def _entered_at(studio: Studio) -> datetime | None:
    """When the studio entered the status it is leaving: `status_updated_at` as it was
    before this transaction changed it (whichever of the two was assigned first)."""
    history = inspect(studio).attrs.status_updated_at.history
    before = history.deleted[0] if history.deleted else studio.status_updated_at
    return as_utc(before) if isinstance(before, datetime) else None


def _on_status_set(studio: Studio, value: Any, old: Any, _initiator: Any) -> None:
    if not isinstance(old, str) or not isinstance(value, str) or old == value:
        return  # a new studio, or only the message changed
    session = object_session(studio)
    if session is None or _metrics_of(session) is None:
        return
    entered = _entered_at(studio)
    seconds = (utcnow() - entered).total_seconds() if entered is not None else 0.0
    session.info.setdefault(_PENDING, []).append((old, value, max(0.0, seconds)))


def _on_commit(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
    if not pending:
        return
    metrics = _metrics_of(session)
    if metrics is None:
        return
    for old, new, seconds in pending:
        metrics.observe_transition(old, new, seconds)


def _on_rollback(session: Session) -> None:
    session.info.pop(_PENDING, None)
