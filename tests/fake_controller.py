"""A real in-process gRPC controller for agent tests.

It serves the two TLS listeners of the real one, with a CA of its own
(controller.agent_ca): the enrollment endpoint (`address`, server TLS: Endpoints and
Enroll, which accepts its join token `token` and issues certificates for
`certificate_lifetime`) and the agent endpoint (mutual TLS: RenewCertificate and
Connect, which read the agent's identity from its certificate). Connect answers Hello
with a Welcome and the full desired set it holds, records everything the agent sends,
and lets a test push DesiredState at any time. It can be stopped and started again on
the same ports to test reconnects. `revoke(agent_id)` refuses that agent as the real
controller does; `calls` records every RPC with its metadata (a man-in-the-middle test
asserts the token never reached it).

With `acks=True` checkpoint events are acknowledged as the real controller does (it
"records" an event on receipt); `drop_acks=N` then loses the next N acks (as a stream
that breaks after the controller's commit would) and `refuse` names sessions whose
events are refused. The default, `acks=False`, plays a controller older than acks
(the agent then re-sends events on reconnects for a while), which the agent tests
written before acks existed rely on.

With `visits=True` it takes connection visits (Welcome `connection_visits`) and acks
each copy; the default plays a controller older than the connection audit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
from studios.agent.v1 import agent_pb2 as pb
from studios.agent.v1 import agent_pb2_grpc as pb_grpc

from controller.agent_ca import AgentCA, CaError
from studios_shared.agent_pki import AgentIdentity, format_join_token

__all__ = ["FakeController", "MemoryCaFiles", "desired"]

if TYPE_CHECKING:
    # Requests are Any: `read()` also returns `grpc.aio.EOF`, which the stubs leave out.
    _ConnectContext = grpc.aio.ServicerContext[Any, pb.ConnectResponse]


class MemoryCaFiles:
    """A CA's files in memory (controller.agent_ca.CaFiles)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def read(self, name: str) -> bytes | None:
        return self.files.get(name)

    def write(self, name: str, data: bytes, *, secret: bool) -> None:
        self.files[name] = data


def desired(
    session_id: str,
    status: int = pb.DESIRED_STATUS_RUNNING,
    generation: int = 1,
    image: str = "studios/python-http:3.11-0.1",
    restore_uri: str = "",
    checkpoint_base_uri: str = "",
    environment: dict[str, str] | None = None,
) -> pb.SessionDesired:
    return pb.SessionDesired(
        session_id=session_id,
        status=status,  # type: ignore[arg-type]
        generation=generation,
        spec=pb.SessionSpec(
            image=image,
            tool="python-http",
            environment=environment or {},
            studio_name=f"studio {session_id}",
            checkpoint_base_uri=checkpoint_base_uri,
        ),
        restore=pb.CheckpointRef(checkpoint_id=1, uri=restore_uri) if restore_uri else None,
    )


class FakeController:
    def __init__(
        self,
        token: str = "agent-secret-0123456789",
        key: bytes = b"k" * 32,
        heartbeat: int = 1,
        *,
        acks: bool = False,
        protocols: frozenset[int] = frozenset({pb.PROTOCOL_VERSION_V1, pb.PROTOCOL_VERSION_V2}),
        certificate_lifetime: float = 3600.0,
        server_names: Sequence[str] = ("127.0.0.1", "localhost"),
        ca: AgentCA | None = None,
        assign_agent_id: str = "",
        chain_extra: bytes = b"",
        visits: bool = False,
    ) -> None:
        self.ca = ca if ca is not None else AgentCA.open(MemoryCaFiles())
        # The join token an agent's token file holds (its secret is `token`).
        self.secret = token
        self.token = format_join_token(token, self.ca.hash)
        self.key = key
        self.heartbeat = heartbeat
        self.acks = acks
        self.visits = visits
        # The protocol versions it speaks: {V1} plays a controller older than V2.
        self.protocols = protocols
        self.certificate_lifetime = certificate_lifetime
        self.server_names = list(server_names)
        # Enroll answers with this agent id instead of the one asked for.
        self.assign_agent_id = assign_agent_id
        # Appended to the chain its listeners present (a rogue showing another's CA).
        self.chain_extra = chain_extra
        self.drop_acks = 0
        self.refuse: set[str] = set()
        # Every ack sent, in order: (stream number, ack).
        self.acked: list[tuple[int, pb.CheckpointAck]] = []
        # Everything received, in order: (stream number, message).
        self.received: list[tuple[int, pb.ConnectRequest]] = []
        # Every RPC, in order: (method, its metadata).
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.enrollments: list[pb.EnrollRequest] = []
        self.renewals: list[AgentIdentity] = []
        # Each stream's (identity, certificate serial), by stream number - 1.
        self.stream_certificates: list[tuple[AgentIdentity, int]] = []
        # agent id -> when it was revoked.
        self.revoked: dict[str, datetime] = {}
        self.streams = 0
        self.refused = 0
        self.desired: dict[str, pb.SessionDesired] = {}
        # One per live stream; None in a queue ends its stream if its agent is revoked.
        self._queues: list[asyncio.Queue[pb.ConnectResponse | None]] = []
        self._servers: list[grpc.aio.Server] = []
        self.port = 0
        self.agent_port = 0
        self._changed = asyncio.Event()

    # ------------------------------------------------------------ server

    async def start(self, port: int = 0) -> int:
        """Both listeners; `port` is the enrollment endpoint's (the agent endpoint keeps
        the port it had, if it had one)."""
        key_pem, chain_pem = self.ca.server_credentials(self.server_names)
        chain_pem += self.chain_extra
        enrollment = grpc.aio.server()
        pb_grpc.add_AgentServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _EnrollmentEndpoint(self), enrollment
        )
        self.port = enrollment.add_secure_port(
            f"127.0.0.1:{port}", grpc.ssl_server_credentials([(key_pem, chain_pem)])
        )
        agents = grpc.aio.server()
        pb_grpc.add_AgentServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _AgentEndpoint(self), agents
        )
        self.agent_port = agents.add_secure_port(
            f"127.0.0.1:{self.agent_port}",
            grpc.ssl_server_credentials(
                [(key_pem, chain_pem)],
                root_certificates=self.ca.certificate_pem,
                require_client_auth=True,
            ),
        )
        self._servers = [enrollment, agents]
        for server in self._servers:
            await server.start()
        return self.port

    async def stop(self) -> None:
        for server in self._servers:
            await server.stop(grace=None)
        self._servers = []
        self._queues.clear()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------ test API

    def revoke(self, agent_id: str) -> None:
        """Refuse the agent from now on (its streams end with UNAUTHENTICATED)."""
        self.revoked[agent_id] = datetime.now(UTC)
        for q in self._queues:
            q.put_nowait(None)

    def enroll_calls(self) -> list[dict[str, str]]:
        return [metadata for method, metadata in self.calls if method == "Enroll"]

    def push(self, *sessions: pb.SessionDesired, full: bool = False) -> None:
        """Update the held desired set and send it (partial unless full) to the agent."""
        if full:
            self.desired = {}
        for s in sessions:
            self.desired[s.session_id] = s
        msg = pb.ConnectResponse(desired=pb.DesiredState(full=full, sessions=list(sessions)))
        for q in self._queues:
            q.put_nowait(msg)

    def messages(self, kind: str) -> list[Any]:
        return [getattr(m, kind) for _, m in self.received if m.WhichOneof("message") == kind]

    def observed(self, session_id: str) -> list[pb.SessionObserved]:
        """Every observation of a session, from SessionObserved and Inventory, in order."""
        out = []
        for _, m in self.received:
            kind = m.WhichOneof("message")
            if kind == "session" and m.session.session_id == session_id:
                out.append(m.session)
            elif kind == "inventory":
                out.extend(s for s in m.inventory.sessions if s.session_id == session_id)
        return out

    def latest(self, session_id: str) -> pb.SessionObserved | None:
        obs = self.observed(session_id)
        return obs[-1] if obs else None

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {predicate}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=0.2)
            except TimeoutError:
                pass

    async def wait_status(
        self, session_id: str, status: int, generation: int | None = None, timeout: float = 20.0
    ) -> pb.SessionObserved:
        def check() -> pb.SessionObserved | None:
            obs = self.latest(session_id)
            if obs is not None and obs.status == status:
                if generation is None or obs.generation == generation:
                    return obs
            return None

        result: pb.SessionObserved = await self.wait_for(check, timeout)
        return result

    # ------------------------------------------------------------ servicer

    # ------------------------------------------------------------ servicer

    def _call(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
        metadata = {k: str(v) for k, v in (context.invocation_metadata() or ())}
        self.calls.append((method, metadata))
        self._changed.set()
        return metadata

    async def _refuse(
        self, context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, details: str
    ) -> None:
        self.refused += 1
        self._changed.set()
        await context.abort(code, details)

    async def _peer(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[AgentIdentity, int]:
        """The caller's identity from its client certificate (verified by the TLS layer)."""
        certs = list(context.auth_context().get("x509_pem_cert") or ())
        found = self.ca.agent_of(certs[0]) if certs else None
        if found is None:
            await self._refuse(
                context, grpc.StatusCode.UNAUTHENTICATED, "no agent certificate of this CA"
            )
            raise AssertionError("unreachable")
        identity, serial = found
        when = self.revoked.get(identity.agent_id)
        if when is not None:
            await self._refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"agent {identity.agent_id} revoked at {when:%Y-%m-%dT%H:%M:%SZ}",
            )
        return identity, serial

    def _issue(self, csr_pem: bytes, identity: AgentIdentity) -> tuple[bytes, int]:
        issued = self.ca.sign_agent(csr_pem, identity, timedelta(seconds=self.certificate_lifetime))
        return issued.certificate_pem, int(issued.not_after.timestamp())

    async def Endpoints(
        self,
        request: pb.EndpointsRequest,
        context: grpc.aio.ServicerContext[pb.EndpointsRequest, pb.EndpointsResponse],
    ) -> pb.EndpointsResponse:
        self._call("Endpoints", context)
        # An empty host: the host the agent dialled the enrollment endpoint at.
        return pb.EndpointsResponse(
            agent_endpoint=f":{self.agent_port}", server_names=self.server_names
        )

    async def Enroll(
        self,
        request: pb.EnrollRequest,
        context: grpc.aio.ServicerContext[pb.EnrollRequest, pb.EnrollResponse],
    ) -> pb.EnrollResponse:
        metadata = self._call("Enroll", context)
        if metadata.get("authorization") != f"Bearer {self.token}":
            await self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, "invalid join token")
        self.enrollments.append(request)
        identity = AgentIdentity(self.assign_agent_id or request.agent_id, request.compute_env_id)
        try:
            cert_pem, not_after = self._issue(request.csr_pem, identity)
        except CaError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.EnrollResponse(
            agent_id=identity.agent_id,
            certificate_pem=cert_pem,
            ca_certificate_pem=self.ca.certificate_pem,
            not_after=not_after,
        )

    async def RenewCertificate(
        self,
        request: pb.RenewCertificateRequest,
        context: grpc.aio.ServicerContext[pb.RenewCertificateRequest, pb.RenewCertificateResponse],
    ) -> pb.RenewCertificateResponse:
        self._call("RenewCertificate", context)
        identity, _ = await self._peer(context)
        try:
            cert_pem, not_after = self._issue(request.csr_pem, identity)
        except CaError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.renewals.append(identity)
        self._changed.set()
        return pb.RenewCertificateResponse(certificate_pem=cert_pem, not_after=not_after)

    async def Connect(self, request_iterator: Any, context: _ConnectContext) -> None:
        self._call("Connect", context)
        identity, serial = await self._peer(context)
        self.streams += 1
        stream = self.streams
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("message") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first message must be Hello")
        self._record(stream, first)
        self.stream_certificates.append((identity, serial))
        if (first.hello.agent_id, first.hello.compute_env_id) != (
            identity.agent_id,
            identity.compute_env_id,
        ):
            await self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"Hello names agent {first.hello.agent_id} of {first.hello.compute_env_id}; "
                f"the certificate {identity.agent_id} of {identity.compute_env_id}",
            )
        if first.hello.protocol_version not in self.protocols:
            # What a controller that does not speak the version answers (a V1 one's words).
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {first.hello.protocol_version} is not supported "
                f"(supported: {sorted(self.protocols)})",
            )
        await context.write(
            pb.ConnectResponse(
                welcome=pb.Welcome(
                    protocol_version=first.hello.protocol_version,
                    agent_id=first.hello.agent_id,
                    heartbeat_interval_seconds=self.heartbeat,
                    connect_token_key=self.key,
                    checkpoint_acks=self.acks,
                    connection_visits=self.visits,
                )
            )
        )
        queue: asyncio.Queue[pb.ConnectResponse | None] = asyncio.Queue()
        queue.put_nowait(
            pb.ConnectResponse(
                desired=pb.DesiredState(full=True, sessions=list(self.desired.values()))
            )
        )
        self._queues.append(queue)

        async def reader() -> None:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    return
                self._record(stream, msg)
                if msg.WhichOneof("message") == "checkpoint" and self.acks:
                    ack = self._ack(msg.checkpoint)
                    if ack is not None:
                        self.acked.append((stream, ack))
                        queue.put_nowait(pb.ConnectResponse(checkpoint_ack=ack))
                if msg.WhichOneof("message") == "visit" and self.visits:
                    queue.put_nowait(
                        pb.ConnectResponse(
                            visit_ack=pb.ConnectionVisitAck(
                                visit_id=msg.visit.visit_id, closed_at_ms=msg.visit.closed_at_ms
                            )
                        )
                    )

        read_task = asyncio.create_task(reader())
        try:
            while True:
                get = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({get, read_task}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    item = get.result()
                    if item is None:
                        await self._peer(context)  # aborts when revoked
                        continue
                    await context.write(item)
                else:
                    get.cancel()
                    return
        finally:
            read_task.cancel()
            if queue in self._queues:
                self._queues.remove(queue)

    def _ack(self, event: pb.CheckpointEvent) -> pb.CheckpointAck | None:
        if self.drop_acks > 0:
            self.drop_acks -= 1
            return None
        refused = event.session_id in self.refuse
        return pb.CheckpointAck(
            session_id=event.session_id,
            key=event.key,
            generation=event.generation,
            result=(
                pb.CHECKPOINT_ACK_RESULT_REFUSED if refused else pb.CHECKPOINT_ACK_RESULT_RECORDED
            ),
            message=f"session {event.session_id} is unknown" if refused else "",
        )

    def acks_for(self, session_id: str) -> list[pb.CheckpointAck]:
        return [a for _, a in self.acked if a.session_id == session_id]

    def _record(self, stream: int, msg: pb.ConnectRequest) -> None:
        self.received.append((stream, msg))
        self._changed.set()


class _EnrollmentEndpoint(pb_grpc.AgentServiceServicer):
    """Server TLS: Endpoints and Enroll (the rest UNIMPLEMENTED, as on the real one)."""

    def __init__(self, controller: FakeController) -> None:
        self.controller = controller

    async def Endpoints(
        self,
        request: pb.EndpointsRequest,
        context: grpc.aio.ServicerContext[pb.EndpointsRequest, pb.EndpointsResponse],
    ) -> pb.EndpointsResponse:
        return await self.controller.Endpoints(request, context)

    async def Enroll(
        self,
        request: pb.EnrollRequest,
        context: grpc.aio.ServicerContext[pb.EnrollRequest, pb.EnrollResponse],
    ) -> pb.EnrollResponse:
        return await self.controller.Enroll(request, context)


class _AgentEndpoint(pb_grpc.AgentServiceServicer):
    """Mutual TLS: RenewCertificate and Connect."""

    def __init__(self, controller: FakeController) -> None:
        self.controller = controller

    async def RenewCertificate(
        self,
        request: pb.RenewCertificateRequest,
        context: grpc.aio.ServicerContext[pb.RenewCertificateRequest, pb.RenewCertificateResponse],
    ) -> pb.RenewCertificateResponse:
        return await self.controller.RenewCertificate(request, context)

    async def Connect(self, request_iterator: Any, context: _ConnectContext) -> None:
        await self.controller.Connect(request_iterator, context)
