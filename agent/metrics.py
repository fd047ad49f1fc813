"""The agent's Prometheus metrics (issue 16, "Operable daemons").

Every agent has a registry of its own (tests run several in one process). Most figures
are read from what the agent keeps anyway, when scraped: sessions by status (the
manager), connections and bytes (the proxy's running totals), volume sizes and the disk
budget, the controller stream. Two kinds of events are recorded as they happen, through
the layers the daemon hands the session context:

- checkpoint saves and restores: each store is wrapped in `TimedCheckpointStore`
  (restic's way: a store is layered, the layer does one thing), which times every
  operation and counts the bytes saved;
- volume growth: `SessionContext.on_volume_grown` gets each growth as the disk watcher
  records it.

Served on the agent's `--metrics` listener only (studios_shared.metrics_server), never
on the connect proxy's port: that port is the browsers'.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.checkpoints.store import LATEST, CheckpointStore, ProgressFn, SavedCheckpoint
from agent.controller_link import ControllerLink
from agent.proxy import ConnectProxy
from agent.sessions import SessionManager

__all__ = ["AgentMetrics", "TimedCheckpointStore"]

# Small incremental saves take a fraction of a second; a first save or a restore of
# gigabytes over S3, minutes.
_CHECKPOINT_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
# Measured: 7 ms idle, 300-600 ms under a buffered write load, 16-18 ms with direct I/O.
_GROW_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_SESSION_STATUSES = ("building", "starting", "running", "stopping", "stopped", "errored")


class AgentMetrics:
    """The metrics of one agent. `attach` the parts once they exist."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.checkpoint_seconds = Histogram(
            "studios_agent_checkpoint_duration_seconds",
            "Checkpoint saves and restores, by operation (save, restore) and outcome (ok, error)",
            ["operation", "outcome"],
            buckets=_CHECKPOINT_BUCKETS,
            registry=self.registry,
        )
        self.checkpoint_bytes = Counter(
            "studios_agent_checkpoint_saved_bytes",
            "Size of the checkpoints saved (what each one holds, before deduplication)",
            registry=self.registry,
        )
        self.volume_growths = Counter(
            "studios_agent_volume_growths",
            "Online growths of session volumes",
            registry=self.registry,
        )
        self.volume_grow_seconds = Histogram(
            "studios_agent_volume_grow_duration_seconds",
            "How long one online growth of a session volume took",
            buckets=_GROW_BUCKETS,
            registry=self.registry,
        )
        self.manager: SessionManager | None = None
        self.proxy: ConnectProxy | None = None
        self.link: Callable[[], ControllerLink | None] = lambda: None
        self.registry.register(_StateCollector(self))

    def attach(
        self,
        manager: SessionManager,
        proxy: ConnectProxy | None = None,
        link: Callable[[], ControllerLink | None] | None = None,
    ) -> None:
        """Read these parts when scraped; time the manager's checkpoint stores and count
        its volume growths from now on."""
        self.manager = manager
        manager.context.store_layer = self.timed_store
        manager.context.on_volume_grown = self.volume_grown
        if proxy is not None:
            self.proxy = proxy
        if link is not None:
            self.link = link

    def timed_store(self, store: CheckpointStore) -> CheckpointStore:
        return TimedCheckpointStore(store, self)

    def volume_grown(self, event: dict[str, Any]) -> None:
        self.volume_growths.inc()
        seconds = event.get("seconds")
        if isinstance(seconds, int | float):
            self.volume_grow_seconds.observe(float(seconds))

    async def scrape(self) -> bytes:
        return generate_latest(self.registry)


class TimedCheckpointStore(CheckpointStore):
    """A checkpoint store that times what the store under it does."""

    def __init__(self, inner: CheckpointStore, metrics: AgentMetrics) -> None:
        self.inner = inner
        self._metrics = metrics

    def _observe(self, operation: str, started: float, ok: bool) -> None:
        self._metrics.checkpoint_seconds.labels(operation, "ok" if ok else "error").observe(
            time.monotonic() - started
        )

    async def save(
        self,
        session_id: str,
        source_dir: Path,
        parent: str | None = LATEST,
        progress: ProgressFn | None = None,
    ) -> SavedCheckpoint:
        started, ok = time.monotonic(), False
        try:
            saved = await self.inner.save(session_id, source_dir, parent, progress)
            ok = True
        finally:
            self._observe("save", started, ok)
        self._metrics.checkpoint_bytes.inc(saved.size_bytes)
        return saved

    async def restored_size(self, uri: str) -> int:
        return await self.inner.restored_size(uri)

    async def restore(
        self,
        uri: str,
        target_dir: Path,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> tuple[str, ...]:
        started, ok = time.monotonic(), False
        try:
            warnings = await self.inner.restore(uri, target_dir, progress, cancel)
            ok = True
        finally:
            self._observe("restore", started, ok)
        return warnings


class _StateCollector(Collector):
    """What is read when scraped: sessions, volumes, the proxy, the controller link."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        if m.manager is not None:
            yield from _session_metrics(m.manager)
        if m.proxy is not None:
            yield from _proxy_metrics(m.proxy)
        link = m.link()
        connected = GaugeMetricFamily(
            "studios_agent_controller_connected",
            "Whether the agent's stream to the controller is up (1) or not (0)",
        )
        connected.add_metric([], 1.0 if link is not None and link.connected else 0.0)
        yield connected
        connects = CounterMetricFamily(
            "studios_agent_controller_connects",
            "Streams to the controller established (a reconnect counts again)",
        )
        connects.add_metric([], float(link.connects if link is not None else 0))
        yield connects


def _session_metrics(manager: SessionManager) -> Iterable[Metric]:
    counts = manager.counts()
    sessions = GaugeMetricFamily(
        "studios_agent_sessions", "Sessions on this host, by status", labels=["status"]
    )
    for status in sorted(set(_SESSION_STATUSES) | set(counts)):
        sessions.add_metric([status], float(counts.get(status, 0)))
    yield sessions
    handles = manager.handles()
    volumes = [h.volume for h in handles if h.volume is not None]
    size = GaugeMetricFamily(
        "studios_agent_volume_size_bytes", "Size of the session volumes held on this host"
    )
    size.add_metric([], float(sum(v.size_bytes for v in volumes)))
    yield size
    used = GaugeMetricFamily(
        "studios_agent_volume_used_bytes",
        "Bytes used in the session volumes, as last measured",
    )
    used.add_metric([], float(sum(v.used_bytes for v in volumes)))
    yield used
    # One compute environment per agent: every session has its budget, the default's
    # when none is held.
    caps = [manager.disk_cap_for(h) for h in handles if h.volume is not None]
    cap = max(caps) if caps else manager.settings.disk_cap_bytes
    budget = GaugeMetricFamily(
        "studios_agent_disk_budget_bytes",
        "The compute environment's disk budget on this host (bootDiskSizeGb)",
    )
    budget.add_metric([], float(cap))
    yield budget
    free = GaugeMetricFamily(
        "studios_agent_disk_budget_free_bytes",
        "What the volumes have left of the disk budget (negative: over it)",
    )
    free.add_metric([], float(manager.disk_budget_free(cap)))
    yield free


def _proxy_metrics(proxy: ConnectProxy) -> Iterable[Metric]:
    # Worker processes sharing the port (--proxy-workers) included.
    stats = proxy.total_stats()
    open_now = GaugeMetricFamily(
        "studios_agent_proxy_connections_open", "Client connections open at the connect proxy"
    )
    open_now.add_metric([], float(proxy.open_connections))
    yield open_now
    total = CounterMetricFamily(
        "studios_agent_proxy_connections", "Client connections the connect proxy accepted"
    )
    total.add_metric([], float(stats.connections))
    yield total
    relayed = CounterMetricFamily(
        "studios_agent_proxy_bytes",
        "Bytes through the connect proxy: received from clients (from_clients) and "
        "tools' bytes relayed to clients (to_clients)",
        labels=["direction"],
    )
    relayed.add_metric(["from_clients"], float(stats.bytes_from_clients))
    relayed.add_metric(["to_clients"], float(stats.bytes_to_clients))
    yield relayed
    spliced = CounterMetricFamily(
        "studios_agent_proxy_spliced_bytes",
        "Of the tools' bytes relayed to clients, those moved by os.splice in the kernel "
        "(--proxy-relay splice), never copied through the agent",
    )
    spliced.add_metric([], float(stats.bytes_spliced))
    yield spliced
