"""The controller process: database, gRPC servers, HTTP server, reconciler.

Started in that order and stopped in reverse, so a systemd stop ends
cleanly: the reconciler first, then the agent streams (each records its
agent as disconnected), then the REST API, then the database.

Two gRPC servers, both TLS with the agent CA (docs/contract-notes.md "Agent
enrollment"): the enrollment endpoint (`--grpc`, server TLS) and the agent
endpoint (`--grpc-agents`, mutual TLS). There is no plaintext listener.

Several controllers on one PostgreSQL (README "Operating"): with `--secrets-key-file`
the secrets come from the database (controller.shared_secrets); change notifications
between controllers go through LISTEN/NOTIFY (controller.notify); agents' leases are
renewed by the controller holding their streams (controller.agent_service); shared
background jobs run on the controller holding their job lease (controller.leader).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import timedelta

import grpc
from aiohttp import web
from sqlalchemy import or_, update
from studios.agent.v1 import agent_pb2_grpc

from controller import (
    web_auth,
    web_compute_envs,
    web_console,
    web_datalinks,
    web_events,
    web_labels,
    web_misc,
    web_orgs,
    web_studios,
    web_teams,
    web_users,
    web_workspaces,
)
from controller.agent_hub import AgentHub
from controller.agent_service import (
    AgentEndpoint,
    AgentService,
    EnrollmentEndpoint,
    EnrollmentSettings,
)
from controller.bootstrap import bootstrap, ensure_data_dir
from controller.checkpoint_gc import CheckpointGc
from controller.compute_envs_service import ComputeEnvService
from controller.config import ControllerConfig
from controller.db import Database
from controller.deadlines import Deadlines, DeadlineSettings
from controller.leader import Leader
from controller.lifespan import LifespanEnforcer
from controller.metrics import ControllerMetrics
from controller.models import Agent, utcnow
from controller.notify import ClusterBus
from controller.observed import ObservationHandler
from controller.orgs_service import OrgService
from controller.placement import Placer
from controller.reconciler import Reconciler
from controller.secret_box import SecretBox, register_box
from controller.shared_secrets import load_controller_secrets, read_secrets_key
from controller.signin import SIGNIN_KEY, SignInSettings, derive_session_key
from controller.studio_events import events_for
from controller.studios_service import StudioService
from controller.teams_service import TeamService
from controller.templates import load_catalogue
from controller.users_service import UserService
from controller.web_app import make_app
from controller.workspaces_service import WorkspaceService
from studios_shared.metrics_server import MetricsServer

__all__ = ["Controller", "Services", "default_controller_id", "default_server_names"]

log = logging.getLogger(__name__)

# gRPC keepalive: notice dead agent connections within about a minute, and
# allow agents to ping as often as every 10 s.
_GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]


_WILDCARDS = {"", "0.0.0.0", "::"}


def default_server_names(*bind_hosts: str) -> list[str]:
    """The server certificate's names when `--grpc-advertise` is not given.

    localhost and the loopback addresses, each specific bind host, and this host's names
    when a listener binds every address."""
    names = ["localhost", "127.0.0.1", "::1"]
    for host in bind_hosts:
        if host in _WILDCARDS:
            names += [socket.gethostname(), socket.getfqdn()]
        else:
            names.append(host)
    return sorted({n for n in names if n})


def default_controller_id() -> str:
    """This process's name in leases: readable in logs, unique across restarts."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(slots=True)
class Services:
    """What the web handlers use (stored in the app under SERVICES_KEY)."""

    studios: StudioService
    workspaces: WorkspaceService
    compute_envs: ComputeEnvService
    users: UserService
    hub: AgentHub
    orgs: OrgService
    teams: TeamService


class Controller:
    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.db: Database | None = None
        self.hub = AgentHub()
        self.reconciler: Reconciler | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.grpc_agents_server: grpc.aio.Server | None = None
        self.runner: web.AppRunner | None = None
        self.http_port: int = config.http_port
        # The enrollment endpoint's and the agent endpoint's bound ports.
        self.grpc_port: int = config.grpc_port
        self.grpc_agents_port: int = config.grpc_agents_port
        # PEM of the agent CA (tests trust it).
        self.ca_certificate_pem: bytes = b""
        self.public_url: str = ""
        self.studios: StudioService | None = None
        self.checkpoint_gc: CheckpointGc | None = None
        self.agent_service: AgentService | None = None
        # Prometheus metrics: always counted, served only on `--metrics` (metrics_port).
        self.metrics: ControllerMetrics | None = None
        self.metrics_server: MetricsServer | None = None
        self.controller_id = config.controller_id or default_controller_id()
        # Several controllers: notifications between them, and the job leases.
        self.bus: ClusterBus | None = None
        self.leader: Leader | None = None

    async def start(self) -> None:
        cfg = self.config
        # First: a broken catalogue stops the controller before it listens or migrates.
        catalogue = load_catalogue(cfg.templates_file)
        ensure_data_dir(cfg.data_dir)
        secrets_key = read_secrets_key(cfg.secrets_key_file) if cfg.secrets_key_file else None

        self.db = db = Database(cfg.effective_database_url)
        await db.migrate()
        shared = await load_controller_secrets(db, cfg.data_dir, secrets_key)
        master_key = shared.connect_key
        ca = shared.ca
        await bootstrap(db, cfg.data_dir, ca)
        self.metrics = ControllerMetrics(db, self.hub)
        self.ca_certificate_pem = ca.certificate_pem
        names = cfg.grpc_advertise or default_server_names(cfg.grpc_host, cfg.grpc_agents_host)
        key_pem, chain_pem = ca.server_credentials(names)
        # Data-link credentials are sealed with this key (controller.secret_box).
        secret_box = SecretBox(shared.credentials_key)
        register_box(db.engine, secret_box)
        if db.is_sqlite:
            # Streams of a previous process are gone, whatever the table says.
            async with db.transaction() as session:
                await session.execute(update(Agent).values(connected=False))
        else:
            # Other controllers' agents stay theirs; only leases that ran out are over.
            async with db.transaction() as session:
                await session.execute(
                    update(Agent)
                    .where(or_(Agent.lease_expires_at.is_(None), Agent.lease_expires_at < utcnow()))
                    .values(connected=False, controller_id=None)
                )
            events = events_for(db.engine.sync_engine)
            self.bus = ClusterBus(cfg.effective_database_url, self.hub, events)
            await self.bus.start()
            self.hub.publisher = self.bus.publish
            events.on_committed = self.bus.publish_studios
            self.leader = Leader(db, self.controller_id, lease_seconds=cfg.job_lease_seconds)

        placer = Placer(db, self.hub)
        self.reconciler = Reconciler(
            placer,
            self.hub,
            interval=cfg.reconcile_interval_seconds,
            resync_interval=cfg.resync_interval_seconds,
            lifespans=LifespanEnforcer(db, self.hub),
            lifespan_interval=cfg.lifespan_check_interval_seconds,
            deadlines=Deadlines(
                db,
                self.hub,
                DeadlineSettings(
                    agent_lost_seconds=cfg.agent_lost_seconds,
                    starting_deadline_seconds=cfg.starting_deadline_seconds,
                    stopping_deadline_seconds=cfg.stopping_deadline_seconds,
                ),
            ),
        )
        self.reconciler.leader = self.leader
        # The agent endpoint first: Endpoints names its bound port.
        self.grpc_agents_server = grpc.aio.server(options=_GRPC_OPTIONS)
        agents_address = _join(cfg.grpc_agents_host, cfg.grpc_agents_port)
        self.grpc_agents_port = self.grpc_agents_server.add_secure_port(
            agents_address,
            grpc.ssl_server_credentials(
                [(key_pem, chain_pem)],
                root_certificates=ca.certificate_pem,
                require_client_auth=True,
            ),
        )
        if self.grpc_agents_port == 0:
            raise OSError(f"cannot listen for agents (gRPC, mutual TLS) on {agents_address}")
        self.agent_service = agent_service = AgentService(
            db,
            self.hub,
            ObservationHandler(db),
            self.reconciler,
            master_key,
            cfg.heartbeat_interval_seconds,
            EnrollmentSettings(
                ca=ca,
                cert_lifetime=timedelta(seconds=cfg.agent_cert_lifetime_seconds),
                agent_endpoint=cfg.grpc_agents_advertise or f":{self.grpc_agents_port}",
                server_names=names,
            ),
            controller_id=self.controller_id,
            lease_seconds=cfg.agent_lease_seconds,
        )
        if self.bus is not None:
            agent_service.start_leases()
        # The generated gRPC module carries no annotations.
        agent_pb2_grpc.add_AgentServiceServicer_to_server(  # type: ignore[no-untyped-call]
            AgentEndpoint(agent_service), self.grpc_agents_server
        )
        self.grpc_server = grpc.aio.server(options=_GRPC_OPTIONS)
        agent_pb2_grpc.add_AgentServiceServicer_to_server(  # type: ignore[no-untyped-call]
            EnrollmentEndpoint(agent_service), self.grpc_server
        )
        grpc_address = _join(cfg.grpc_host, cfg.grpc_port)
        self.grpc_port = self.grpc_server.add_secure_port(
            grpc_address, grpc.ssl_server_credentials([(key_pem, chain_pem)])
        )
        if self.grpc_port == 0:
            raise OSError(f"cannot listen for enrollment (gRPC, TLS) on {grpc_address}")
        await self.grpc_agents_server.start()
        await self.grpc_server.start()

        self.studios = StudioService(
            db,
            self.hub,
            placer,
            master_key,
            public_url="",
            connect_token_ttl=cfg.connect_token_ttl_seconds,
            catalogue=catalogue,
        )
        app = make_app(
            db,
            Services(
                studios=self.studios,
                workspaces=WorkspaceService(db, self.hub),
                compute_envs=ComputeEnvService(db, self.hub),
                users=UserService(db, self.hub),
                hub=self.hub,
                orgs=OrgService(db, self.hub),
                teams=TeamService(db, self.hub),
            ),
        )
        self.metrics.install(app)
        # Browser sign-in cookies are signed with a key of their own, derived from the master key.
        signin = app[SIGNIN_KEY] = SignInSettings(key=derive_session_key(master_key))
        web_datalinks.setup(app, db, secret_box)
        web_labels.setup(app, db)
        web_compute_envs.setup(app, db)
        for module in (
            # Before web_studios: /studios/events is not a session id.
            web_events,
            web_console,
            web_studios,
            web_compute_envs,
            web_misc,
            web_users,
            web_workspaces,
            web_orgs,
            web_teams,
            web_auth,
            web_datalinks,
            web_labels,
        ):
            app.add_routes(module.routes)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, cfg.http_host, cfg.http_port)
        await site.start()
        self.http_port = _bound_port(self.runner, cfg.http_port)
        self.public_url = (
            cfg.public_url or f"http://{_join(cfg.http_host, self.http_port)}"
        ).rstrip("/")
        self.studios.public_url = self.public_url
        signin.public_url = self.public_url
        if cfg.metrics_port is not None:
            self.metrics_server = MetricsServer(self.metrics.scrape)
            await self.metrics_server.start(cfg.metrics_host, cfg.metrics_port)

        self.reconciler.start()
        # Checkpoint data of deleted studios is collected in the background.
        self.checkpoint_gc = CheckpointGc(
            db,
            interval_s=cfg.checkpoint_gc_interval_seconds,
            poll_s=cfg.checkpoint_gc_poll_seconds,
            grace_s=cfg.checkpoint_gc_grace_seconds,
            s3_endpoint=cfg.s3_endpoint,
        )
        self.checkpoint_gc.leader = self.leader
        self.checkpoint_gc.start()
        log.info(
            "studio-controller listening: HTTP on http://%s, gRPC enrollment (TLS) on %s, "
            "gRPC agents (mutual TLS) on %s (public URL %s; server certificate names %s; "
            "agent CA sha256 %s; %s)",
            _join(cfg.http_host, self.http_port),
            _join(cfg.grpc_host, self.grpc_port),
            _join(cfg.grpc_agents_host, self.grpc_agents_port),
            self.public_url,
            ",".join(names),
            ca.hash,
            f"one of several controllers as {self.controller_id}"
            if self.bus is not None
            else "single controller",
        )

    async def stop(self) -> None:
        if self.checkpoint_gc is not None:
            await self.checkpoint_gc.stop()
            self.checkpoint_gc = None
        if self.reconciler is not None:
            await self.reconciler.stop()
        if self.leader is not None:
            await self.leader.release()
        if self.agent_service is not None:
            await self.agent_service.drain(grace_s=5.0)
            self.agent_service = None
        for server in (self.grpc_server, self.grpc_agents_server):
            if server is not None:
                await server.stop(grace=2.0)
        self.grpc_server = self.grpc_agents_server = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.metrics_server is not None:
            await self.metrics_server.close()
            self.metrics_server = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.bus is not None:
            self.hub.publisher = None
            await self.bus.close()
            self.bus = None
        if self.db is not None:
            await self.db.close()
            self.db = None
        log.info("studio-controller stopped")


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested
