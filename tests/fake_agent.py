"""A fake agent for controller tests: a real gRPC client speaking agent.proto.

It does nothing on its own: a test tells it what to report (`report`,
`checkpoint`, `inventory`) and waits for what the controller sends
(`wait_desired`). Everything received is kept in `responses`.

It speaks the current protocol version; a test plays an older agent by
overriding `hello_request` and `response_type` with messages generated from an
older copy of agent.proto (tests/controller/test_protocol_upgrade.py).

Like the real agent it enrolls first: `target` is the controller's enrollment
endpoint and `token` a join token. It fetches the controller's certificate chain,
keeps the CA whose hash the token pins (a token that pins nothing, like "wrong",
trusts the chain's root: the controller's refusal is what such a test is after),
asks `Endpoints` where the agent endpoint is, enrolls with a fresh key, and
connects there over mutual TLS. What it got is kept per (CA, agent id), as an
agent keeps it in its state directory, so a second FakeAgent of the same id
(a reconnect) presents the same certificate. `credentials=` presents given ones
(an attacker with another agent's certificate).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from studios.agent.v1 import agent_pb2 as pb
from studios.agent.v1 import agent_pb2_grpc

from studios_shared.agent_pki import AgentIdentity, new_key_and_csr, parse_join_token

__all__ = [
    "CONNECT_METHOD",
    "HARNESS_STORE",
    "AgentCredentials",
    "FakeAgent",
    "agent_endpoint",
    "checkpoint_uri",
    "enroll",
    "fetch_ca",
    "forget_credentials",
    "observed",
]

# A host that is generous with its capacity at enrollment (the cap placement honours);
# capacity-cap tests pass `enroll_capacity`.
BIG_HOST = pb.HostCapacity(
    cpus=64,
    memory_bytes=1 << 40,
    memory_available_bytes=1 << 40,
    disk_free_bytes=1 << 44,
    disk_budget_free_bytes=1 << 44,
)


@dataclass(frozen=True)
class AgentCredentials:
    """What an enrolled agent keeps: its key and certificate, and the CA."""

    agent_id: str
    key_pem: bytes
    certificate_pem: bytes
    ca_pem: bytes
    not_after: int

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.certificate_pem,
        )


# (CA hash, agent id) -> credentials: the fake agents' "state directories".
_ENROLLED: dict[tuple[str, str], AgentCredentials] = {}


def forget_credentials() -> None:
    _ENROLLED.clear()


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def _chain_der(target: str) -> list[bytes]:
    """The certificate chain the server at `target` presents (not verified: pinned next)."""
    host, port = _split(target)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        # Public from Python 3.13 on (SSLSocket.get_unverified_chain).
        chain = tls._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
        return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain]  # type: ignore[attr-defined]


async def fetch_ca(target: str, pin: str | None) -> bytes:
    """PEM of the CA in the server's chain whose SHA-256 is `pin` (the chain's last
    certificate when there is no pin); ValueError when none matches."""
    chain = await asyncio.to_thread(_chain_der, target)
    for der in reversed(chain):
        if pin is None or hashlib.sha256(der).hexdigest() == pin:
            return ssl.DER_cert_to_PEM_cert(der).encode()
    raise ValueError(f"{target}: no certificate of the server's chain has the pinned hash")


async def agent_endpoint(enrollment_target: str, ca_pem: bytes) -> str:
    """Where the agent endpoint is, as `Endpoints` says (asked on every connect)."""
    async with grpc.aio.secure_channel(
        enrollment_target, grpc.ssl_channel_credentials(root_certificates=ca_pem)
    ) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
        answer = await stub.Endpoints(pb.EndpointsRequest(), timeout=10)
    host, _, port = answer.agent_endpoint.rpartition(":")
    if not host:
        host = enrollment_target.rpartition(":")[0]
    return f"{host}:{port}"


async def enroll(
    target: str,
    token: str,
    *,
    agent_id: str,
    compute_env_id: str,
    capacity: pb.HostCapacity | None = None,
    csr_pem: bytes | None = None,
    key_pem: bytes | None = None,
    timeout: float = 10.0,
) -> AgentCredentials:
    """Enroll at the enrollment endpoint `target`; AioRpcError when refused. (`timeout`:
    a benchmark enrolling hundreds at once on a busy host needs longer.)"""
    try:
        pin: str | None = parse_join_token(token).ca_hash
    except ValueError:
        pin = None
    ca_pem = await fetch_ca(target, pin)
    if csr_pem is None:
        key_pem, csr_pem = new_key_and_csr(AgentIdentity(agent_id or "new", compute_env_id))
    async with grpc.aio.secure_channel(
        target, grpc.ssl_channel_credentials(root_certificates=ca_pem)
    ) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
        answer = await stub.Enroll(
            pb.EnrollRequest(
                agent_id=agent_id,
                compute_env_id=compute_env_id,
                csr_pem=csr_pem,
                hostname="fake-host",
                capacity=capacity if capacity is not None else BIG_HOST,
            ),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=timeout,
        )
    return AgentCredentials(
        agent_id=answer.agent_id,
        key_pem=key_pem or b"",
        certificate_pem=answer.certificate_pem,
        ca_pem=answer.ca_certificate_pem,
        not_after=answer.not_after,
    )


# The one RPC, by path: the fake writes any message class that encodes agent.proto.
CONNECT_METHOD = "/studios.agent.v1.AgentService/Connect"


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def observed(
    session_id: str,
    generation: int,
    status: int,
    *,
    message: str = "",
    tool_port: int = 0,
    root_dir: str = "",
    progress: Iterable[pb.ProgressStep] = (),
) -> pb.SessionObserved:
    return pb.SessionObserved(
        session_id=session_id,
        generation=generation,
        status=status,  # type: ignore[arg-type]
        message=message,
        runtime="local",
        tool_port=tool_port,
        root_dir=root_dir,
        progress=list(progress),
    )


# The checkpoint store of the harness's compute environment (workDir file:///tmp/work):
# the controller records only checkpoints in the studio's store (agent_authorizer).
HARNESS_STORE = "file:///tmp/work/.studios/checkpoints"


def checkpoint_uri(session_id: str, key: str, store: str = HARNESS_STORE) -> str:
    """Where an agent of the harness's compute environment keeps checkpoint `key`:
    ``<store>/manifests/<session>/<last part of key>``."""
    return f"{store}/manifests/{session_id}/{key.rsplit('/', 1)[-1]}"


class FakeAgent:
    # What the controller's answers are decoded as.
    response_type: Any = pb.ConnectResponse

    def __init__(
        self,
        target: str,
        token: str,
        *,
        agent_id: str,
        compute_env_id: str,
        proxy_url: str = "http://localhost:7070",
        memory_available: int = 8 << 30,
        protocol_version: int = pb.PROTOCOL_VERSION_V2,
        credentials: AgentCredentials | None = None,
        enroll_capacity: pb.HostCapacity | None = None,
        proxy_instance_id: str = "",
    ) -> None:
        self.target = target
        # Given (an attacker presenting another agent's certificate), or enrolled by connect.
        self.credentials = credentials
        self.enroll_capacity = enroll_capacity
        self.token = token
        self.agent_id = agent_id
        self.compute_env_id = compute_env_id
        self.proxy_url = proxy_url
        self.memory_available = memory_available
        self.protocol_version = protocol_version
        # Hello.proxy_instance_id: the run of the agent's proxy its visits come from.
        self.proxy_instance_id = proxy_instance_id
        self.responses: list[pb.ConnectResponse] = []
        self.welcome: pb.Welcome | None = None
        self.error: grpc.aio.AioRpcError | None = None
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def hello(self) -> pb.Hello:
        return pb.Hello(
            protocol_version=self.protocol_version,  # type: ignore[arg-type]
            agent_id=self.agent_id,
            hostname="fake-host",
            compute_env_id=self.compute_env_id,
            runtime_kind=pb.RUNTIME_KIND_LOCAL,
            proxy_url=self.proxy_url,
            agent_version="test",
            capacity=pb.HostCapacity(
                cpus=4, memory_bytes=16 << 30, memory_available_bytes=self.memory_available
            ),
            proxy_instance_id=self.proxy_instance_id,
        )

    def hello_request(self) -> Any:
        return pb.ConnectRequest(hello=self.hello())

    async def connect(
        self,
        *,
        inventory: Iterable[pb.SessionObserved] | None = None,
        first: pb.ConnectRequest | None = None,
        wait_welcome: bool = True,
    ) -> None:
        """Enroll unless enrolled, open the stream, send Hello (or `first`) and optionally
        an Inventory."""
        try:
            credentials = self.credentials or await self._enrolled()
            endpoint = await agent_endpoint(self.target, credentials.ca_pem)
        except grpc.aio.AioRpcError as exc:
            # Refused at enrollment (bad token, unknown compute environment): the
            # refusal is the answer, for `wait_error` to see.
            if wait_welcome:
                raise
            self.error = exc
            self._reader = asyncio.create_task(asyncio.sleep(0))
            return
        self.credentials = credentials
        self._channel = grpc.aio.secure_channel(endpoint, credentials.channel_credentials())
        connect = self._channel.stream_stream(
            CONNECT_METHOD,
            request_serializer=_serialize,
            response_deserializer=self.response_type.FromString,
        )
        self._call = connect()
        try:
            await self._call.write(first or self.hello_request())
            if inventory is not None:
                await self.send(pb.ConnectRequest(inventory=pb.Inventory(sessions=list(inventory))))
        except grpc.aio.AioRpcError as exc:
            # The controller may refuse the stream (bad token, bad Hello) before a write
            # goes through: the refusal is the answer, for `wait_error` to see.
            if wait_welcome:
                raise
            self.error = exc
        self._reader = asyncio.create_task(self._read())
        if wait_welcome:
            await self.wait_for(lambda r: r.HasField("welcome"))

    async def _enrolled(self) -> AgentCredentials:
        try:
            ca_hash = parse_join_token(self.token).ca_hash
        except ValueError:
            ca_hash = ""
        key = (ca_hash, self.agent_id)
        known = _ENROLLED.get(key) if ca_hash else None
        if known is not None:
            return known
        credentials = await enroll(
            self.target,
            self.token,
            agent_id=self.agent_id,
            compute_env_id=self.compute_env_id,
            capacity=self.enroll_capacity,
        )
        if ca_hash:
            _ENROLLED[key] = credentials
        return credentials

    async def _read(self) -> None:
        try:
            while True:
                msg = await self._call.read()
                if msg is grpc.aio.EOF:
                    return
                if msg.HasField("welcome"):
                    self.welcome = msg.welcome
                self.responses.append(msg)
                self._changed.set()
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            self._changed.set()

    async def send(self, request: Any) -> None:
        await self._call.write(request)

    async def report(self, session_id: str, generation: int, status: int, **kwargs: Any) -> None:
        await self.send(
            pb.ConnectRequest(session=observed(session_id, generation, status, **kwargs))
        )

    async def inventory(self, sessions: Iterable[pb.SessionObserved]) -> None:
        await self.send(pb.ConnectRequest(inventory=pb.Inventory(sessions=list(sessions))))

    async def checkpoint(
        self,
        session_id: str,
        generation: int,
        key: str,
        status: int = pb.CHECKPOINT_STATUS_FINALIZED,
        *,
        uri: str | None = None,
        size: int = 1234,
        saved_at: int | None = None,
    ) -> None:
        await self.send(
            pb.ConnectRequest(
                checkpoint=pb.CheckpointEvent(
                    session_id=session_id,
                    generation=generation,
                    key=key,
                    uri=uri or checkpoint_uri(session_id, key),
                    status=status,  # type: ignore[arg-type]
                    size_bytes=size,
                    saved_at=int(time.time()) if saved_at is None else saved_at,
                )
            )
        )

    async def visit(self, visit: pb.ConnectionVisit) -> pb.ConnectionVisitAck:
        """Report a connection visit and wait for the controller's ack of that copy."""
        start = len(self.responses)
        await self.send(pb.ConnectRequest(visit=visit))
        msg = await self.wait_for(
            lambda r: (
                r.HasField("visit_ack")
                and r.visit_ack.visit_id == visit.visit_id
                and r.visit_ack.closed_at_ms == visit.closed_at_ms
            ),
            start=start,
        )
        return msg.visit_ack

    async def wait_for(
        self,
        predicate: Callable[[pb.ConnectResponse], bool],
        *,
        start: int = 0,
        timeout: float = 10.0,
    ) -> pb.ConnectResponse:
        """The first response from index `start` on that matches `predicate`."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for msg in self.responses[start:]:
                if predicate(msg):
                    return msg
            if self._reader is not None and self._reader.done():
                raise AssertionError(f"stream ended ({self.error!r}) while waiting")
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"timed out; received: {self.responses}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()

    async def wait_desired(
        self,
        session_id: str,
        status: int | None = None,
        *,
        full: bool | None = None,
        start: int = 0,
        timeout: float = 10.0,
    ) -> pb.SessionDesired:
        """The first SessionDesired of `session_id` (with `status`) since index `start`."""

        def matches(msg: pb.ConnectResponse) -> bool:
            if not msg.HasField("desired") or (full is not None and msg.desired.full != full):
                return False
            return any(
                s.session_id == session_id and (status is None or s.status == status)
                for s in msg.desired.sessions
            )

        msg = await self.wait_for(matches, start=start, timeout=timeout)
        return next(s for s in msg.desired.sessions if s.session_id == session_id)

    def acks(self, session_id: str | None = None) -> list[pb.CheckpointAck]:
        """Every CheckpointAck received (of `session_id`), in order."""
        return [
            m.checkpoint_ack
            for m in self.responses
            if m.HasField("checkpoint_ack")
            and (session_id is None or m.checkpoint_ack.session_id == session_id)
        ]

    async def wait_ack(
        self, session_id: str, key: str, *, start: int = 0, timeout: float = 10.0
    ) -> pb.CheckpointAck:
        """The first CheckpointAck of (session_id, key) since response index `start`."""
        msg = await self.wait_for(
            lambda r: (
                r.HasField("checkpoint_ack")
                and r.checkpoint_ack.session_id == session_id
                and r.checkpoint_ack.key == key
            ),
            start=start,
            timeout=timeout,
        )
        return msg.checkpoint_ack

    async def wait_error(self, timeout: float = 10.0) -> grpc.aio.AioRpcError:
        assert self._reader is not None
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        assert self.error is not None, "the stream ended without an error"
        return self.error

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._channel is not None:
            await self._channel.close()
