"""`studio-agent serve`: wires the parts together and runs them until told to stop.

Shutdown leaves running tools running (Nomad's rule): the next agent process on
the same state directory re-adopts them from their handles.

Under systemd (`Type=notify`, studios_shared.sd_notify) `serve` reports READY=1 once
the agent serves: its sessions recovered from their handles, the connect proxy and the
admin socket listening, and the first stream to the controller established or, failing
that, `ready_wait_seconds` (15 s) gone by. Not the stream alone: an agent whose
controller is down still serves the sessions it runs (the proxy, checkpoints, the
admin socket) and reconnects by itself, and a unit waiting for the controller would
be killed and restarted by systemd at its start timeout for nothing. The bounded wait
lets the usual start (controller up) report ready connected, so that what is ordered
after the agent finds it placeable. The watchdog is pinged from the event loop with a
STATUS= line of sessions and link.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studios.agent.v1 import agent_pb2 as pb

from agent import __version__
from agent.admin import AdminServer
from agent.controller_link import ControllerLink
from agent.datalinks import DataLinkMounter, backend_named, data_links_json
from agent.enrollment import PkiFiles
from agent.errors import AgentError
from agent.host import doctor_report, host_capacity
from agent.host_mounts import MountBackend
from agent.metrics import AgentMetrics
from agent.proxy import ConnectProxy
from agent.proxy.server import PortHeldError
from agent.proxy.workers import ProxyWorkers, WorkerError
from agent.runtime import RuntimeOptions, create_runtime
from agent.sessions import SessionHandle, SessionManager, SessionSettings
from agent.state import ENDED_STATUSES, StateDir, atomic_write_bytes
from agent.volumes import GIB, VolumeInfo, create_volume_kind
from studios_shared.metrics_server import MetricsServer
from studios_shared.sd_notify import Notifier

__all__ = ["DRAIN_MODES", "Agent", "AgentConfig", "session_json"]

log = logging.getLogger(__name__)

# `studio-agent drain`: the modes as the admin socket and DIR/drain name them.
DRAIN_MODES = {"stop": pb.DRAIN_MODE_STOP, "wait": pb.DRAIN_MODE_WAIT}


@dataclass
class AgentConfig:
    controller: str
    token_file: Path
    compute_env: str
    state_dir: Path
    runtime: str = "local"
    proxy_host: str = "127.0.0.1"
    # 0 = any free port (tests).
    proxy_port: int = 7070
    proxy_domain: str = "localhost"
    # How the proxy relays the tools' bytes (`--proxy-relay`): copy (through Python) or
    # splice (in the kernel, Linux). Copy by default: on uvloop (bench_proxy_relay, three
    # rounds, 2 cores, load 4-5) splice took about 30% less proxy CPU per 1 MiB response
    # but was faster in only two rounds of three, and it took more CPU per 1 KiB request
    # in two rounds of three (up to 36%: its tool side is a transport in Python, copy's
    # is uvloop's in C). On the agent's own asyncio loop (bench_proxy, kernel 6.18, quiet
    # host) splice took 386 us of proxy CPU per 1 MiB response against copy's 407, but
    # the tool then spent 783 us sending it against 646, and the rate was no better
    # (0.67x direct against 0.63-0.73x): most of the proxy's CPU for a large body is the
    # kernel's loopback TCP send to the browser, which splice does not avoid.
    proxy_relay: str = "copy"
    # Proxy processes sharing the port (`--proxy-workers`): 1 = the agent's own only.
    proxy_workers: int = 1
    local_templates: Path | None = None
    # Who runs local tools (`--local-tool-user`): session (a uid per session when root)
    # or agent (the agent's own user; development only).
    local_tool_user: str = "session"
    stop_grace_seconds: float = 30.0
    start_timeout_seconds: float = 60.0
    # Custom environments (`--env-build-timeout-seconds`, `--env-build-disk-gib`,
    # `--conda-channel`): a build's limits, and the conda channels it may use.
    env_build_timeout_seconds: float = 1800.0
    env_build_disk_bytes: int = 8 * GIB
    conda_channels: tuple[str, ...] = ()
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    disk_watch_seconds: float = 5.0
    disk_cap_bytes: int = 30 * GIB
    # Session volumes: auto | xfs-loop | directory (`--volume-kind`).
    volume_kind: str = "auto"
    # podman runtime settings of this host (`--podman-socket`, `--podman-runtime`,
    # `--container-ulimit`); e.g. runc and nofile/nproc <= 1024 on hybrid-cgroup hosts.
    podman_socket: Path = Path("/run/podman/podman.sock")
    podman_runtime: str = ""
    container_ulimits: tuple[str, ...] = ()
    # Each podman session's network (`--podman-network`): bridge (a network of its own,
    # isolated) or host (unsafe: sessions reach each other and the host's loopback).
    podman_network: str = "bridge"
    # Interim checkpoints of a running session (`--checkpoint-interval-seconds`).
    checkpoint_interval_seconds: float = 300.0
    # S3-compatible endpoint for s3:// checkpoint stores (`--s3-endpoint`); keys come
    # from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the endpoint also from
    # STUDIOS_S3_ENDPOINT.
    s3_endpoint: str | None = None
    # How often a final checkpoint that failed is tried again.
    unsaved_retry_seconds: float = 60.0
    # FUSE helper for data-links (`--data-link-mounter`): auto | s3fs | rclone.
    data_link_mounter: str = "auto"
    # Host directories file-system mounts may lie under (`--allow-host-path`, repeatable);
    # none: the agent makes no file-system mount.
    allowed_host_paths: tuple[str, ...] = ()
    # The separate /metrics listener (`--metrics`); port None: not served.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    # Under systemd: how long READY=1 waits for the first controller stream.
    ready_wait_seconds: float = 15.0


def _os_reason(exc: OSError) -> str:
    """The system's words ("Address already in use"): asyncio replaces `strerror` with a
    sentence of its own."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _data_link_backend(name: str) -> MountBackend | None:
    """The configured FUSE helper; one named explicitly must be usable here."""
    backend = backend_named(name)
    if name != "auto" and backend is not None:
        usable, why = backend.available()
        if not usable:
            raise AgentError(f"--data-link-mounter {name}: {why}")
    return backend


def _volume_json(v: VolumeInfo | None) -> dict[str, Any] | None:
    if v is None:
        return None
    return {"kind": v.kind, "path": v.path, "sizeBytes": v.size_bytes, "usedBytes": v.used_bytes}


def session_json(h: SessionHandle) -> dict[str, Any]:
    """One entry of `studio-agent sessions --json`."""
    return {
        "id": h.session_id,
        "generation": h.generation,
        "status": h.status,
        "message": h.message,
        "runtime": h.runtime,
        # What the tool runs: the template's image, or the one built for the studio's
        # custom environment (then `template` is the template's).
        "image": h.image or h.spec.image,
        "template": h.spec.image,
        "tool": h.spec.tool,
        "toolPort": h.port,
        "pid": h.pid,
        "rootDir": h.visible_root,
        "logPath": h.log_path,
        "volume": _volume_json(h.volume),
        "startedAt": h.started_at,
        "exited": h.exited,
        "exitCode": h.exit_code,
        "unsaved": h.unsaved,
        # This run's newest checkpoint (the parent of its next, incremental one).
        "checkpointUri": h.checkpoint_uri,
        "dataLinks": data_links_json(s.to_json() for s in h.data_links),
        "progress": [
            {"name": s.name, "status": s.status, "message": s.message} for s in h.progress
        ],
        # The custom environment's build (without its log: `buildLogPath` has it).
        "build": {k: v for k, v in h.build.items() if k != "log"},
        "buildLogPath": (
            str(Path(h.log_path).with_name("build.log")) if h.spec.conda_environment else ""
        ),
    }


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.state = StateDir(config.state_dir)
        self.agent_id = ""
        self.manager: SessionManager | None = None
        self.link: ControllerLink | None = None
        self.proxy: ConnectProxy | None = None
        self.proxy_workers: ProxyWorkers | None = None
        self.admin: AdminServer | None = None
        self.proxy_port = 0
        self.metrics = AgentMetrics()
        self.metrics_server: MetricsServer | None = None
        self._lock_fd: int | None = None
        self._started_at = 0.0
        # `studio-agent drain`: "" (not draining), "stop" or "wait"; kept in DIR/drain so
        # that a restarted agent is still drained.
        self.drain = ""

    @property
    def _drain_path(self) -> Path:
        return self.state.root / "drain"

    def _load_drain(self) -> str:
        try:
            mode = self._drain_path.read_text().strip()
        except FileNotFoundError:
            return ""
        if mode not in DRAIN_MODES:
            log.warning("ignoring %s: unknown drain mode %r", self._drain_path, mode)
            return ""
        return mode

    @property
    def proxy_url(self) -> str:
        return f"http://{self.config.proxy_domain}:{self.proxy_port}"

    def _lock(self) -> None:
        fd = os.open(self.state.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AgentError(
                f"another agent is already running with state directory {self.state.root}"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def start(self) -> None:
        cfg = self.config
        # Fail on configuration errors before touching anything.
        runtime = create_runtime(
            cfg.runtime,
            RuntimeOptions(
                local_templates=cfg.local_templates,
                local_tool_user=cfg.local_tool_user,
                podman_socket=cfg.podman_socket,
                oci_runtime=cfg.podman_runtime,
                ulimits=tuple(cfg.container_ulimits),
                podman_network=cfg.podman_network,
            ),
        )
        volumes = create_volume_kind(cfg.volume_kind)
        try:
            self.state.ensure()
        except OSError as exc:
            raise AgentError(
                f"--state-dir: cannot create {self.state.root}: {_os_reason(exc)}"
            ) from None
        self._lock()
        try:
            await asyncio.to_thread(self._check_token_file)
            self.agent_id = self.state.agent_id()
            self.drain = self._load_drain()
            runtime.owner = self.agent_id
            self._started_at = time.time()
            self.manager = SessionManager(
                state=self.state,
                runtime=runtime,
                volumes=volumes,
                settings=SessionSettings(
                    stop_grace_seconds=cfg.stop_grace_seconds,
                    start_timeout_seconds=cfg.start_timeout_seconds,
                    disk_cap_bytes=cfg.disk_cap_bytes,
                    watch_interval_seconds=cfg.disk_watch_seconds,
                    checkpoint_interval_seconds=cfg.checkpoint_interval_seconds,
                    unsaved_retry_seconds=cfg.unsaved_retry_seconds,
                    s3_endpoint=cfg.s3_endpoint,
                    allowed_host_paths=tuple(cfg.allowed_host_paths),
                    env_build_timeout_seconds=cfg.env_build_timeout_seconds,
                    env_build_disk_bytes=cfg.env_build_disk_bytes,
                    conda_channels=tuple(cfg.conda_channels),
                ),
                datalinks=DataLinkMounter(_data_link_backend(cfg.data_link_mounter)),
            )
            # Before recovery: a store opened from now on is timed.
            self.metrics.attach(self.manager, link=lambda: self.link)
            await self.manager.recover()
            self.manager.start()
            self.proxy = ConnectProxy(
                lookup=self.manager.get,
                key=self._connect_key,
                on_activity=self._report_connections,
                cookie_max=lambda: self.link.connect_cookie_max_seconds if self.link else None,
                on_visit=self._report_visit,
                splice=cfg.proxy_relay == "splice",
            )
            shared = cfg.proxy_workers > 1
            try:
                self.proxy_port = await self.proxy.start(
                    cfg.proxy_host, cfg.proxy_port, reuse_port=shared
                )
            except PortHeldError as exc:
                raise AgentError(f"--proxy: {exc.strerror}") from None
            except OSError as exc:
                raise AgentError(
                    f"--proxy: cannot listen on {cfg.proxy_host}:{cfg.proxy_port}: "
                    f"{_os_reason(exc)}"
                ) from None
            on_desired: Callable[[bool, list[pb.SessionDesired]], Awaitable[None] | None] = (
                self.proxy.apply_desired_access
            )
            if shared:
                manager = self.manager
                self.proxy_workers = ProxyWorkers(
                    self.proxy,
                    count=cfg.proxy_workers - 1,
                    host=cfg.proxy_host,
                    port=self.proxy_port,
                    sessions=lambda: [(h.session_id, h) for h in manager.handles()],
                    splice=cfg.proxy_relay == "splice",
                )
                try:
                    await self.proxy_workers.start()
                except WorkerError as exc:
                    raise AgentError(f"--proxy-workers: {exc}") from None
                on_desired = self.proxy_workers.apply_desired_access_and_wait
            self.metrics.proxy = self.proxy
            self.link = ControllerLink(
                target=cfg.controller,
                token_file=cfg.token_file,
                agent_id=self.agent_id,
                compute_env_id=cfg.compute_env,
                runtime_name=runtime.name,
                proxy_url=self.proxy_url,
                manager=self.manager,
                state=self.state,
                backoff_initial=cfg.backoff_initial,
                backoff_max=cfg.backoff_max,
            )
            self.link.on_agent_id = self._on_agent_id
            if self.proxy_workers is not None:
                # The link set itself as the sessions' sink: the workers hear of each
                # change of a session at once too.
                publish, workers = self.manager.on_observed, self.proxy_workers

                def observed(obs: pb.SessionObserved) -> None:
                    publish(obs)
                    workers.push_state()

                self.manager.on_observed = observed
            self.link.on_desired = on_desired
            self.link.connections_snapshot = self.proxy.all_connections
            self.link.proxy_instance_id = self.proxy.instance_id
            self.link.drain = DRAIN_MODES.get(self.drain, pb.DRAIN_MODE_NONE)
            self.admin = AdminServer(
                self.state.socket_path,
                {
                    "status": self._status,
                    "sessions": self._sessions,
                    "disk": self._disk,
                    "doctor": self._doctor,
                },
                actions={"drain": self._drain_action, "undrain": self._undrain_action},
            )
            await self.admin.start()
            if cfg.metrics_port is not None:
                self.metrics_server = MetricsServer(self.metrics.scrape)
                try:
                    await self.metrics_server.start(cfg.metrics_host, cfg.metrics_port)
                except OSError as exc:
                    self.metrics_server = None
                    bind = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
                    raise AgentError(
                        f"--metrics: cannot listen on {cfg.metrics_host}:{cfg.metrics_port}: "
                        f"{_os_reason(bind)}"
                    ) from None
            # Last, once every listener is bound: a port in use fails the start alone,
            # before the agent has said anything to the controller (or logged trying).
            self.link.start()
        except BaseException:
            await self.close()
            raise
        log.info(
            "agent %s serving: runtime %s, proxy %s, controller %s",
            self.agent_id,
            runtime.name,
            self.proxy_url,
            cfg.controller,
        )

    def _check_token_file(self) -> None:
        """An agent that must enroll needs its join token: a file it cannot read, or an
        empty one, is said now, once, rather than retried forever. One enrolled already
        (a certificate in DIR/pki that has not expired) connects with that and never reads
        the token file. A token that is there but wrong (not a join token, refused) is
        reported and retried as before: the operator may fix the file while it runs."""
        try:
            creds = PkiFiles(self.state).load()
        except OSError as exc:
            raise AgentError(
                f"--state-dir: cannot read this agent's certificate and key in "
                f"{self.state.pki_dir}: {exc.filename}: {_os_reason(exc)}"
            ) from None
        if creds is not None and not creds.expired():
            return
        path = self.config.token_file
        try:
            text = path.read_text().strip()
        except OSError as exc:
            reason = f"cannot read token file {path}: {_os_reason(exc)}"
        else:
            if text:
                return
            reason = f"token file {path} is empty"
        why = "" if creds is None else " (its certificate expired: it must enroll again)"
        raise AgentError(f"--token-file: {reason}{why}")

    async def close(self) -> None:
        """Stop the agent; running tools keep running."""
        # Freeze session work first: a start still waiting for its tool must not time out
        # and record an error while the slower parts (the stream, the proxy) shut down.
        if self.manager is not None:
            await self.manager.close()
        if self.admin is not None:
            await self.admin.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
            self.metrics_server = None
        if self.link is not None:
            await self.link.close()
        if self.proxy_workers is not None:
            # Their visits are reported through the agent's proxy: before it closes.
            await self.proxy_workers.close()
        if self.proxy is not None:
            # The visits it ends now still reach the link's outbox (sent after a restart).
            await self.proxy.close()
        self._unlock()

    async def serve(self, stop: asyncio.Event) -> None:
        systemd = Notifier.from_environment()
        # Pinged while starting too: recovering many sessions may take a while.
        watchdog = asyncio.create_task(
            systemd.watchdog_loop(self._systemd_status), name="systemd-watchdog"
        )
        try:
            systemd.status("starting: recovering sessions")
            await self.start()
            try:
                await self._wait_for_controller(stop)
                systemd.ready(self._systemd_status())
                await stop.wait()
            finally:
                systemd.stopping("stopping; running sessions are left running")
                log.info("shutting down; running sessions are left running")
                await self.close()
        finally:
            watchdog.cancel()

    async def _wait_for_controller(self, stop: asyncio.Event) -> None:
        """Until the first controller stream is up, at most `ready_wait_seconds`."""
        deadline = time.monotonic() + self.config.ready_wait_seconds
        while not stop.is_set() and time.monotonic() < deadline:
            if self.link is not None and self.link.connected:
                return
            await asyncio.sleep(0.1)
        if self.link is not None and not self.link.connected and not stop.is_set():
            log.warning(
                "serving without the controller (not connected after %.0f s: %s); "
                "reconnecting in the background",
                self.config.ready_wait_seconds,
                self.link.last_error or "no answer yet",
            )

    def _systemd_status(self) -> str:
        if self.manager is None or self.link is None:
            return "starting: recovering sessions"
        counts = self.manager.counts()
        sessions = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none"
        link = "connected" if self.link.connected else "not connected"
        if not self.link.connected and self.link.last_error:
            link += f" ({self.link.last_error})"
        return f"serving; sessions: {sessions}; controller {self.config.controller}: {link}"

    def _on_agent_id(self, agent_id: str) -> None:
        """The controller enrolled this agent under another id than the one it asked for.
        New sessions carry the new id; tools labelled with the old one (from before a
        re-enrollment) are no longer this agent's to recover or reap."""
        self.agent_id = agent_id
        if self.manager is not None:
            self.manager.runtime.owner = agent_id

    def _connect_key(self) -> bytes | None:
        return self.link.connect_token_key if self.link is not None else None

    def _report_visit(self, visit: pb.ConnectionVisit) -> None:
        if self.link is not None:
            self.link.publish_visit(visit)

    def _report_connections(self, session_id: str) -> None:
        if self.link is not None and self.proxy is not None:
            self.link.publish_connections(self.proxy.connections_message(session_id))

    # ------------------------------------------------------------ admin endpoints

    async def _status(self) -> dict[str, Any]:
        assert self.manager is not None and self.link is not None
        cap = host_capacity(self.state.root, self.manager.disk_budget_free())
        counts = self.manager.counts()
        return {
            "agentId": self.agent_id,
            "version": __version__,
            "pid": os.getpid(),
            "startedAt": int(self._started_at),
            "stateDir": str(self.state.root),
            "controller": self.link.status(),
            "computeEnv": self.config.compute_env,
            "runtime": self.manager.runtime.name,
            "proxyUrl": self.proxy_url,
            # The proxy's worker processes (--proxy-workers), listening now.
            "proxyWorkers": self.proxy_workers.pids() if self.proxy_workers else [],
            "sessions": {"total": sum(counts.values()), **counts},
            "capacity": {
                "cpus": cap["cpus"],
                "memoryBytes": cap["memory_bytes"],
                "memoryAvailableBytes": cap["memory_available_bytes"],
                "diskFreeBytes": cap["disk_free_bytes"],
                "diskBudgetFreeBytes": cap["disk_budget_free_bytes"],
            },
            # Tools and volumes the reaper found that no live session owned (newest last).
            "reaped": list(self.manager.reaped),
            "drain": self._drain_json(),
        }

    def _drain_json(self) -> dict[str, Any]:
        assert self.manager is not None
        active = [h.session_id for h in self.manager.handles() if h.status not in ENDED_STATUSES]
        return {"draining": bool(self.drain), "mode": self.drain, "activeSessions": active}

    async def _set_drain(self, mode: str) -> None:
        # On disk first: an agent killed right after the answer is still drained.
        if mode:
            await asyncio.to_thread(atomic_write_bytes, self._drain_path, mode.encode(), 0o600)
        else:
            await asyncio.to_thread(self._drain_path.unlink, True)
        self.drain = mode
        if self.link is not None:
            self.link.set_drain(DRAIN_MODES.get(mode, pb.DRAIN_MODE_NONE))
        log.info(
            "%s",
            f"draining ({mode}): no new sessions; "
            + ("running ones are stopped" if mode == "stop" else "running ones may finish")
            if mode
            else "no longer draining",
        )

    async def _drain_action(self, body: dict[str, Any]) -> dict[str, Any]:
        mode = body.get("mode", "stop")
        if mode not in DRAIN_MODES:
            raise ValueError(f"mode: expected stop or wait, got {mode!r}")
        await self._set_drain(str(mode))
        return self._drain_json()

    async def _undrain_action(self, body: dict[str, Any]) -> dict[str, Any]:
        await self._set_drain("")
        return self._drain_json()

    async def _sessions(self) -> dict[str, Any]:
        assert self.manager is not None and self.proxy is not None
        out = []
        for h in self.manager.handles():
            entry = session_json(h)
            entry["connections"] = self.proxy.connections(h.session_id)
            out.append(entry)
        return {"sessions": out}

    async def _disk(self) -> dict[str, Any]:
        assert self.manager is not None
        out = []
        for h in self.manager.handles():
            vol = _volume_json(h.volume)
            if vol is not None and h.volume is not None:
                fresh = await self.manager.volumes.usage(h.volume)
                vol["sizeBytes"], vol["usedBytes"] = fresh.size_bytes, fresh.used_bytes
            out.append(
                {
                    "id": h.session_id,
                    "status": h.status,
                    "message": h.message,
                    "volume": vol,
                    "capBytes": self.manager.disk_cap_for(h),
                    "growth": self.manager.disk_events(h.session_id),
                }
            )
        return {
            "volumeKind": self.manager.volumes.kind,
            "capBytes": self.manager.settings.disk_cap_bytes,
            "budgetFreeBytes": max(0, self.manager.disk_budget_free()),
            "sessions": out,
        }

    async def _doctor(self) -> dict[str, Any]:
        assert self.manager is not None
        return doctor_report(
            self.manager.runtime.name,
            self.manager.volumes.kind,
            self.config.podman_socket,
            local_tool_user=self.config.local_tool_user,
            podman_network=self.config.podman_network,
        )
