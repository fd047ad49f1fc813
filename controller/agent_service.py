"""The gRPC endpoints agents talk to (docs/contract-notes.md "Agent enrollment").

Two listeners, both TLS with the controller's CA (controller.agent_ca):
`EnrollmentEndpoint` (server TLS: Endpoints and Enroll, a join token for a
certificate) and `AgentEndpoint` (mutual TLS with an enrolled certificate:
RenewCertificate and Connect). Both delegate to one `AgentService`. Each RPC
refuses on the wrong listener: a gRPC server cannot ask for a client certificate
without requiring one, so only the agent endpoint ever sees one.

Connect: one bidirectional stream per agent. The agent is who its certificate
says (agent id and compute environment); the Hello must claim the same. Per
stream a reader task applies what the agent reports, and a writer task sends
what the hub queued (the Welcome, then full or partial DesiredState built from
the database at send time).

Status codes: UNAUTHENTICATED (no enrolled certificate, not this controller's,
or the agent was revoked; a revoked agent's open stream ends with it too),
INVALID_ARGUMENT (first message not a Hello, empty agent id),
PERMISSION_DENIED (the Hello's agent id or compute environment is not the
certificate's), FAILED_PRECONDITION (protocol version not spoken), NOT_FOUND (the
compute environment does not exist; the agent should retry later), ABORTED
(a newer stream of the same agent replaced this one), UNAVAILABLE (the
controller is shutting down; the agent reconnects with backoff).

Protocol versions (docs/contract-notes.md "Protocol versions"): V1 and V2 agents
are served; the Welcome answers in the agent's version. A V1 agent's Hello has
its runtime only as the retired string field, which this side no longer reads:
the agent's runtime is then what it was (or empty for a new agent).

Checkpoint events are acknowledged: the reader records each one in its own
transaction and, once that has committed, writes a CheckpointAck (Welcome says
so with `checkpoint_acks`); the agent drops an event from its outbox only then.
Connection visits (the audit) likewise, with a ConnectionVisitAck (Welcome:
`connection_visits`); before the Welcome, the visits a previous run of the
agent's proxy left open are closed (`Hello.proxy_instance_id`).

Several controllers on one database: the agent's row names the controller holding its
stream (`controller_id`) and a lease (`lease_expires_at`) that this controller renews
every third of the lease for the agents that talked within the lease; a disconnect
is recorded only by the controller that still holds the agent (it may have reconnected
elsewhere already). Liveness is the lease (AgentHub.is_live).

Shutdown drains the streams before the gRPC server and the database stop:
each handler ends its own stream and records the disconnect while the
database is still open. A handler cancelled mid-transaction by the server's
grace timeout would otherwise wait forever on a closed connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from sqlalchemy import Select, or_, select, update
from studios.agent.v1 import agent_pb2, agent_pb2_grpc

from controller import enrollment, lifecycle, signin
from controller.agent_ca import AgentCA
from controller.agent_hub import FULL, AgentHub, AgentStream
from controller.db import Database
from controller.desired import build_desired_state
from controller.drain import drain_mode, record_drain, stop_for_drain
from controller.enrollment import EnrollmentRefused, Refusal
from controller.fault_injection import TEST_FAULTS
from controller.models import Agent, ComputeEnv, Studio, utcnow
from controller.observed import ObservationHandler, capacity_dict, proxy_instance_id
from controller.placement import clamp_capacity, default_capacity_cap
from controller.reconciler import Reconciler
from studios_shared.agent_pki import AgentIdentity
from studios_shared.connect_token import derive_agent_key

if TYPE_CHECKING:
    # Requests are Any: `read()` also returns `grpc.aio.EOF`, which the stubs leave out.
    _Context = grpc.aio.ServicerContext[Any, agent_pb2.ConnectResponse]

__all__ = [
    "SUPPORTED_PROTOCOLS",
    "AgentEndpoint",
    "AgentService",
    "EnrollmentEndpoint",
    "EnrollmentSettings",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# The current version and the one before it: agents of either version connect, so
# a rolling upgrade (controllers first, then agents) never cuts an agent off.
SUPPORTED_PROTOCOLS = frozenset({agent_pb2.PROTOCOL_VERSION_V1, agent_pb2.PROTOCOL_VERSION_V2})

# Hello.runtime_kind as the runtime name stored and shown (GET /agents `runtime`).
_RUNTIME_NAME = {
    agent_pb2.RUNTIME_KIND_LOCAL: "local",
    agent_pb2.RUNTIME_KIND_PODMAN: "podman",
}


def runtime_name(hello: agent_pb2.Hello) -> str | None:
    """The Hello's runtime name; None when not known (V1 agents, unknown values)."""
    return _RUNTIME_NAME.get(hello.runtime_kind)


_CODES = {
    Refusal.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Refusal.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Refusal.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Refusal.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
}

_USE_AGENT_ENDPOINT = "connect on the agent endpoint with an enrolled certificate"


@dataclass(frozen=True)
class EnrollmentSettings:
    """What enrollment needs besides the database: the CA and what Endpoints says."""

    ca: AgentCA
    cert_lifetime: timedelta
    # host:port of the agent endpoint, an empty host meaning the enrollment host.
    agent_endpoint: str
    server_names: Sequence[str]


def _version_name(version: int) -> str:
    try:
        return agent_pb2.ProtocolVersion.Name(version)
    except ValueError:
        return str(version)


class AgentService:
    """The logic of both listeners (EnrollmentEndpoint, AgentEndpoint)."""

    def __init__(
        self,
        db: Database,
        hub: AgentHub,
        observations: ObservationHandler,
        reconciler: Reconciler,
        master_key: bytes,
        heartbeat_interval_seconds: int,
        settings: EnrollmentSettings,
        *,
        controller_id: str = "",
        lease_seconds: float = 30.0,
    ) -> None:
        self.db = db
        # Who holds a stream, and for how long without renewal (several controllers).
        self.controller_id = controller_id
        # At least two and a half heartbeats: a lease shorter than the time between an
        # agent's messages would run out while the agent is fine.
        floor = 2.5 * heartbeat_interval_seconds
        if lease_seconds < floor:
            log.warning(
                "--agent-lease-seconds %.0f is shorter than 2.5 heartbeat intervals: using %.0f s",
                lease_seconds,
                floor,
            )
        self.lease = timedelta(seconds=max(lease_seconds, floor))
        self._lease_task: asyncio.Task[None] | None = None
        self.settings = settings
        self.hub = hub
        self.observations = observations
        self.reconciler = reconciler
        self.master_key = master_key
        self.heartbeat_interval_seconds = heartbeat_interval_seconds
        # Per agent: a connect and a disconnect of the same agent never
        # interleave their database updates.
        self._locks: dict[str, asyncio.Lock] = {}
        self._closing = asyncio.Event()
        self._handlers: set[asyncio.Task[Any]] = set()
        # Each connected agent's drain mode as last recorded ("" not draining).
        self._drain: dict[str, str] = {}

    def start_leases(self) -> None:
        """Renew the leases of this controller's agents from now on."""
        self._lease_task = asyncio.create_task(self._lease_loop(), name="agent-leases")

    async def _lease_loop(self) -> None:
        interval = max(0.2, self.lease.total_seconds() / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew_leases()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("renewing the agents' leases failed; trying again")

    async def renew_leases(self) -> int:
        """Extend the lease of every agent whose stream is here and that talked within
        the lease; mark agents whose lease ran out (wherever they were) disconnected.
        One statement each, whatever the number of agents."""
        horizon = time.monotonic() - self.lease.total_seconds()
        talking = [s.agent_id for s in self.hub.streams() if s.last_message >= horizon]
        now = utcnow()
        renewed = 0
        async with self.db.transaction() as session:
            if talking:
                # Also when a sweep (here or elsewhere) took a lease that ran out while the
                # stream lived (a stalled controller): the stream is here, so is the agent.
                result = await session.execute(
                    update(Agent)
                    .where(
                        Agent.agent_id.in_(talking),
                        or_(
                            Agent.controller_id == self.controller_id,
                            Agent.controller_id.is_(None),
                        ),
                    )
                    .values(
                        lease_expires_at=now + self.lease,
                        connected=True,
                        controller_id=self.controller_id,
                    )
                    .execution_options(synchronize_session=False)
                )
                renewed = int(getattr(result, "rowcount", 0) or 0)
            await session.execute(
                update(Agent)
                .where(Agent.connected.is_(True), Agent.lease_expires_at < now)
                .values(connected=False, controller_id=None)
                .execution_options(synchronize_session=False)
            )
        return renewed

    async def drain(self, grace_s: float) -> None:
        """End every stream and wait (up to `grace_s`) for their handlers to finish."""
        if self._lease_task is not None:
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease_task
            self._lease_task = None
        self._closing.set()
        pending = {t for t in self._handlers if not t.done()}
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=grace_s)
        if late:
            log.warning("%d agent stream(s) did not end within %.0f s", len(late), grace_s)

    # ------------------------------------------------------------ enrollment endpoint

    async def endpoints(self) -> agent_pb2.EndpointsResponse:
        return agent_pb2.EndpointsResponse(
            agent_endpoint=self.settings.agent_endpoint,
            server_names=list(self.settings.server_names),
        )

    async def enroll(
        self, request: agent_pb2.EnrollRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.EnrollResponse:
        token = _bearer(context.invocation_metadata())
        try:
            enrolled = await _to_completion(
                enrollment.enroll(
                    self.db,
                    self.settings.ca,
                    token=token,
                    agent_id=request.agent_id,
                    compute_env_id=request.compute_env_id,
                    csr_pem=request.csr_pem,
                    hostname=request.hostname,
                    capacity=(
                        capacity_dict(request.capacity) if request.HasField("capacity") else None
                    ),
                    lifetime=self.settings.cert_lifetime,
                )
            )
        except EnrollmentRefused as exc:
            log.warning(
                "enrollment refused (peer %s, agent id %r, compute env %r): %s",
                context.peer(),
                request.agent_id,
                request.compute_env_id,
                exc.message,
            )
            await context.abort(_CODES[exc.code], exc.message)
        return agent_pb2.EnrollResponse(
            agent_id=enrolled.agent_id,
            certificate_pem=enrolled.certificate_pem,
            ca_certificate_pem=self.settings.ca.certificate_pem,
            not_after=int(enrolled.not_after.timestamp()),
        )

    # ------------------------------------------------------------ agent endpoint

    async def _identity(self, context: grpc.aio.ServicerContext[Any, Any]) -> AgentIdentity:
        """Who the verified client certificate names; UNAUTHENTICATED when none of ours."""
        pems = list((context.auth_context() or {}).get("x509_pem_cert") or [])
        found = self.settings.ca.agent_of(pems[0]) if pems else None
        if found is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "no agent certificate of this controller's CA; " + _USE_AGENT_ENDPOINT,
            )
        assert found is not None
        return found[0]

    async def _admitted(self, identity: AgentIdentity) -> str | None:
        """Why `identity` may not connect now (revoked, not enrolled), else None."""
        async with self.db.transaction() as session:
            try:
                await enrollment.admitted(session, identity)
            except EnrollmentRefused as exc:
                return exc.message
        return None

    async def renew_certificate(
        self,
        request: agent_pb2.RenewCertificateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> agent_pb2.RenewCertificateResponse:
        identity = await self._identity(context)
        try:
            renewed = await _to_completion(
                enrollment.renew(
                    self.db,
                    self.settings.ca,
                    identity,
                    request.csr_pem,
                    self.settings.cert_lifetime,
                )
            )
        except EnrollmentRefused as exc:
            log.warning("agent %s: renewal refused: %s", identity.agent_id, exc.message)
            await context.abort(_CODES[exc.code], exc.message)
        return agent_pb2.RenewCertificateResponse(
            certificate_pem=renewed.certificate_pem,
            not_after=int(renewed.not_after.timestamp()),
        )

    async def connect(self, request_iterator: Any, context: _Context) -> None:
        """Welcome + full DesiredState, then updates, until the agent goes away."""
        if self._closing.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the controller is shutting down")
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)
        identity = await self._identity(context)
        refused = await _to_completion(self._admitted(identity))
        if refused is not None:
            log.warning("agent %s refused: %s", identity.agent_id, refused)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refused)

        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("message") != "hello":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a Hello"
            )
        hello: agent_pb2.Hello = first.hello
        if hello.protocol_version not in SUPPORTED_PROTOCOLS:
            spoken = ", ".join(_version_name(v) for v in sorted(SUPPORTED_PROTOCOLS))
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {hello.protocol_version} "
                f"({_version_name(hello.protocol_version)}) is not supported "
                f"(supported: {sorted(SUPPORTED_PROTOCOLS)}: {spoken}); "
                "upgrade controllers before their agents",
            )
        if not hello.agent_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Hello.agent_id is empty")
        if (hello.agent_id, hello.compute_env_id) != (identity.agent_id, identity.compute_env_id):
            log.warning(
                "agent %s (compute env %s by its certificate) claimed agent %r of compute env "
                "%r in its Hello: refused (peer %s)",
                identity.agent_id,
                identity.compute_env_id,
                hello.agent_id,
                hello.compute_env_id,
                context.peer(),
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the certificate names agent {identity.agent_id} of compute environment "
                f"{identity.compute_env_id}; the Hello claims agent {hello.agent_id!r} of "
                f"{hello.compute_env_id!r}",
            )
        async with self._lock(hello.agent_id):
            upserted = await _to_completion(self._upsert_agent(hello, identity))
            if upserted is None:
                stream = self.hub.register(identity.agent_id, identity.compute_env_id)
                stream.proxy_instance_id = proxy_instance_id(hello)
                stream.controller_id = self.controller_id
        if upserted is not None and upserted != _NO_ENV:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, upserted)
        if upserted is not None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"compute environment {hello.compute_env_id!r} does not exist",
            )
        log.info(
            "agent %s connected (host %s, compute env %s, runtime %s, proxy %s, protocol %s)",
            hello.agent_id,
            hello.hostname,
            hello.compute_env_id,
            runtime_name(hello) or "not reported",
            hello.proxy_url,
            _version_name(hello.protocol_version),
        )
        welcome = agent_pb2.ConnectResponse(
            welcome=agent_pb2.Welcome(
                # This stream speaks the agent's version.
                protocol_version=hello.protocol_version,
                agent_id=identity.agent_id,
                heartbeat_interval_seconds=self.heartbeat_interval_seconds,
                # Keyed on the enrolled identity: a stolen agent forges access to its own
                # sessions only.
                connect_token_key=derive_agent_key(self.master_key, identity.agent_id),
                checkpoint_acks=True,
                connect_cookie_max_seconds=signin.DEFAULT_TTL_SECONDS,
                connection_visits=True,
            )
        )
        tasks: set[asyncio.Task[Any]] = set()
        # The reader writes acks and the writer desired state: one write at a time.
        out = _Writer(context)
        try:
            await self._close_earlier_visits(stream)
            await context.write(welcome)
            stream.queue.put_nowait(FULL)
            self.reconciler.kick()
            if self._drain.get(stream.agent_id) == "stop":
                await _to_completion(stop_for_drain(self.db, self.hub, stream.agent_id))
            reader = asyncio.create_task(self._read_loop(stream, context, out), name="agent-reader")
            writer = asyncio.create_task(self._write_loop(stream, out), name="agent-writer")
            replaced = asyncio.create_task(stream.replaced.wait(), name="agent-replaced")
            revoked = asyncio.create_task(stream.revoked.wait(), name="agent-revoked")
            closing = asyncio.create_task(self._closing.wait(), name="agent-closing")
            tasks = {reader, writer, replaced, revoked, closing}
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await _to_completion(self._disconnected(stream))
        for task in (reader, writer):
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.warning("agent %s stream failed: %r", stream.agent_id, task.exception())
        if stream.revoked.is_set():
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, stream.revoked_message)
        if stream.replaced.is_set():
            await context.abort(
                grpc.StatusCode.ABORTED, "replaced by a newer stream of the same agent"
            )
        if self._closing.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the controller is shutting down")

    async def _close_earlier_visits(self, stream: AgentStream) -> None:
        """Close the visits an earlier run of the agent's proxy left open, before the
        reader records anything of this run."""
        try:
            await _to_completion(
                self.observations.proxy_restarted(stream.agent_id, stream.proxy_instance_id)
            )
        except Exception:
            # The audit must not keep an agent out; its next connect tries again.
            log.exception("agent %s: closing its proxy's earlier visits failed", stream.agent_id)

    async def _upsert_agent(self, hello: agent_pb2.Hello, identity: AgentIdentity) -> str | None:
        """Record the connect; None, or why not (_NO_ENV: no such compute environment)."""
        async with self.db.transaction() as session:
            if await session.get(ComputeEnv, hello.compute_env_id) is None:
                return _NO_ENV
            # Again, locked: a revocation since the first check wins.
            agent = await session.get(Agent, identity.agent_id, with_for_update=True)
            try:
                await enrollment.admitted(session, identity)
            except EnrollmentRefused as exc:
                return exc.message
            assert agent is not None
            agent.hostname = hello.hostname
            agent.compute_env_id = hello.compute_env_id
            # A V1 agent does not say (in a form this side reads): keep what is known.
            agent.runtime = runtime_name(hello) or agent.runtime or ""
            agent.proxy_url = hello.proxy_url
            agent.agent_version = hello.agent_version
            agent.connected = True
            agent.last_seen = utcnow()
            agent.controller_id = self.controller_id
            agent.lease_expires_at = agent.last_seen + self.lease
            agent.drain = self._drain[identity.agent_id] = drain_mode(hello.drain)
            if hello.HasField("capacity"):
                reported = capacity_dict(hello.capacity)
                if not agent.capacity_cap:
                    # Enrollment carried no capacity: the first Hello's is the cap.
                    agent.capacity_cap = default_capacity_cap(reported)
                agent.capacity = clamp_capacity(reported, agent.capacity_cap)
        return None

    async def _read_loop(self, stream: AgentStream, context: _Context, out: _Writer) -> None:
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                log.info("agent %s closed its stream", stream.agent_id)
                return
            kind = request.WhichOneof("message")
            if stream.superseded:
                # Read before the newer stream took over, handled after: it could undo
                # what the newer stream said (an Inventory from before a start would
                # declare the started session lost). The agent says it all again there.
                log.info(
                    "agent %s: %s from a replaced or revoked stream ignored", stream.agent_id, kind
                )
                return
            stream.last_message = time.monotonic()
            try:
                ack = await _to_completion(self._handle(stream, kind, request))
            except Exception:
                # One bad message must not end the stream: everything is re-sent
                # (a checkpoint event left without its ack on the next connect).
                log.exception("agent %s: handling %s failed", stream.agent_id, kind)
                continue
            if isinstance(ack, agent_pb2.ConnectionVisitAck):
                await out.write(agent_pb2.ConnectResponse(visit_ack=ack))
            elif ack is not None and not TEST_FAULTS.drop_ack(ack.session_id, ack.key):
                # Only now: the transaction that recorded the checkpoint has committed.
                await out.write(agent_pb2.ConnectResponse(checkpoint_ack=ack))

    async def _handle(
        self, stream: AgentStream, kind: str | None, request: Any
    ) -> agent_pb2.CheckpointAck | agent_pb2.ConnectionVisitAck | None:
        """Apply one agent message; for a checkpoint event or a visit, the ack to send."""
        if kind == "checkpoint":
            return await self.observations.checkpoint(stream, request.checkpoint)
        if kind == "visit":
            return await self.observations.visit(stream, request.visit)
        if kind == "inventory":
            resend = await self.observations.inventory(stream, request.inventory)
            self.hub.notify(stream.agent_id, resend)
        elif kind == "session":
            resend = await self.observations.session_observed(stream, request.session)
            self.hub.notify(stream.agent_id, resend)
        elif kind == "capacity":
            await self.observations.capacity(stream.agent_id, request.capacity)
        elif kind == "heartbeat":
            await self.observations.heartbeat(stream.agent_id)
            await self._heartbeat_drain(stream.agent_id, drain_mode(request.heartbeat.drain))
        elif kind == "connections":
            await self.observations.connections(stream, request.connections)
        elif kind == "hello":
            log.warning("agent %s sent a second Hello; ignored", stream.agent_id)
        else:
            log.warning("agent %s sent an empty message", stream.agent_id)
        return None

    async def _heartbeat_drain(self, agent_id: str, mode: str) -> None:
        """Record a drain begun or ended on a live stream; in "stop" mode stop what runs."""
        if mode != self._drain.get(agent_id, ""):
            await record_drain(self.db, agent_id, mode)
            self._drain[agent_id] = mode
            if not mode:
                self.reconciler.kick()  # undrained: pending starts may go there now
        if mode == "stop":
            await stop_for_drain(self.db, self.hub, agent_id)

    async def _write_loop(self, stream: AgentStream, out: _Writer) -> None:
        while True:
            item = await stream.queue.get()
            full = item == FULL
            ids: set[str] = set() if full else set(item)
            # Coalesce what queued up meanwhile into one message.
            while not stream.queue.empty():
                more = stream.queue.get_nowait()
                if more == FULL:
                    full = True
                else:
                    ids |= set(more)
            desired = await _to_completion(self._desired(stream, full, ids))
            if not full and not desired.sessions:
                continue
            await out.write(agent_pb2.ConnectResponse(desired=desired))

    async def _desired(
        self, stream: AgentStream, full: bool, ids: set[str]
    ) -> agent_pb2.DesiredState:
        async with self.db.transaction() as session:
            return await build_desired_state(
                session,
                stream.agent_id,
                full=full,
                session_ids=ids,
                foreign=stream.foreign_sessions if full else (),
            )

    def _lock(self, agent_id: str) -> asyncio.Lock:
        return self._locks.setdefault(agent_id, asyncio.Lock())

    async def _disconnected(self, stream: AgentStream) -> None:
        async with self._lock(stream.agent_id):
            if not self.hub.unregister(stream):
                return  # a newer stream owns the agent now
            await self._record_disconnect(stream)

    async def _record_disconnect(self, stream: AgentStream) -> None:
        log.info("agent %s disconnected", stream.agent_id)
        try:
            async with self.db.transaction() as session:
                agent = await session.get(Agent, stream.agent_id, with_for_update=True)
                if agent is not None and agent.controller_id not in (None, self.controller_id):
                    # It reconnected to another controller meanwhile: that one holds it.
                    return
                if agent is not None:
                    agent.connected = False
                    agent.last_seen = utcnow()
                    agent.controller_id = None
                    agent.lease_expires_at = None
                studios = (
                    await session.scalars(_select_active_on(stream.agent_id).with_for_update())
                ).all()
                for studio in studios:
                    # Not errored: the session may well still run; the agent
                    # reports it again when it reconnects.
                    lifecycle.set_message(
                        studio,
                        f"agent {stream.agent_id} disconnected; waiting for it to reconnect",
                    )
        except Exception:
            log.exception("recording the disconnection of agent %s failed", stream.agent_id)


_NO_ENV = "no such compute environment"


class EnrollmentEndpoint(agent_pb2_grpc.AgentServiceServicer):
    """The server-TLS listener (`--grpc`): Endpoints and Enroll."""

    def __init__(self, service: AgentService) -> None:
        self.service = service

    async def Endpoints(
        self, request: agent_pb2.EndpointsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.EndpointsResponse:
        return await self.service.endpoints()

    async def Enroll(
        self, request: agent_pb2.EnrollRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.EnrollResponse:
        return await self.service.enroll(request, context)

    async def RenewCertificate(
        self,
        request: agent_pb2.RenewCertificateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> agent_pb2.RenewCertificateResponse:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _USE_AGENT_ENDPOINT)
        raise AssertionError("unreachable")

    async def Connect(self, request_iterator: Any, context: _Context) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _USE_AGENT_ENDPOINT)


class AgentEndpoint(agent_pb2_grpc.AgentServiceServicer):
    """The mutual-TLS listener (`--grpc-agents`): RenewCertificate and Connect."""

    def __init__(self, service: AgentService) -> None:
        self.service = service

    async def Endpoints(
        self, request: agent_pb2.EndpointsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.EndpointsResponse:
        return await self.service.endpoints()

    async def Enroll(
        self, request: agent_pb2.EnrollRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.EnrollResponse:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            "enroll at the enrollment endpoint (what `studio-agent --controller` names)",
        )
        raise AssertionError("unreachable")

    async def RenewCertificate(
        self,
        request: agent_pb2.RenewCertificateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> agent_pb2.RenewCertificateResponse:
        return await self.service.renew_certificate(request, context)

    async def Connect(self, request_iterator: Any, context: _Context) -> None:
        await self.service.connect(request_iterator, context)


class _Writer:
    """Serialises the writes of a stream's reader (acks) and writer (desired state)."""

    def __init__(self, context: _Context) -> None:
        self._context = context
        self._lock = asyncio.Lock()

    async def write(self, message: agent_pb2.ConnectResponse) -> None:
        async with self._lock:
            await self._context.write(message)


async def _to_completion(work: Coroutine[Any, Any, _T]) -> _T:
    """Run database work to its end even when the stream is torn down meanwhile.

    A transaction cancelled half-way can keep SQLite's write lock (every
    transaction is BEGIN IMMEDIATE) until its connection is collected, and the
    disconnect that follows then waits out the 30 s busy timeout. The work is
    short, so the stream's end waits for it and the cancellation goes on after.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


def _select_active_on(agent_id: str) -> Select[Studio]:
    return select(Studio).where(
        Studio.agent_id == agent_id,
        Studio.deleted.is_(False),
        Studio.status.in_([s.value for s in lifecycle.ACTIVE]),
    )


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None
