"""The agent's one long-lived gRPC stream to the controller.

On every (re)connect: Hello, wait for Welcome, then every checkpoint event the controller
has not acknowledged, then a full Inventory, then who is connected to each session
(the controller forgets that when a stream ends); after that SessionObserved on each
change, HostCapacity periodically and Heartbeat at the interval Welcome asks for.
Every DesiredState goes to the session manager and to `on_desired` (the proxy's
access lists, which apply to running sessions whatever their generation).
Reconnects with exponential backoff and jitter.

Several controllers (`--controller A:PORT,B:PORT`, controllers sharing one PostgreSQL):
the link talks to one at a time. When a stream breaks or a connect fails it tries the
next one at once, and backs off (exponentially, with jitter) only once every controller
of the list has failed in a row; the sessions run on meanwhile (the proxy keeps serving).
A name that resolves to several addresses is one entry: gRPC tries its addresses in
turn. Every controller of the list shares one CA (controller.shared_secrets), so the
certificate from enrolling at one is valid at all.

What happens while disconnected: observations are coalesced to the newest per
session (the Inventory sent on reconnect carries the latest state anyway), while
checkpoint events are kept on disk in an outbox (`Outbox`).

Checkpoint events are acknowledged. A controller whose Welcome sets
`checkpoint_acks` answers each event with a CheckpointAck once the transaction
that recorded it has committed; the outbox drops an event only on that ack,
never on send, and every unacknowledged event goes again before the Inventory on
each reconnect (oldest first: a stop finished while the stream was down is `stopped` in
the Inventory, and the controller should have its final checkpoint by then; a controller
that has not yet keeps the studio stopping, as the report names that checkpoint,
`SessionObserved.final_checkpoint_key`), and on a live stream when its ack is more than a
minute late (the controller may have failed to record it). A copy is harmless:
the controller records each (session, key) once and acks every copy. An ack
that says REFUSED (the session is unknown to the controller: nothing can change
that) or SUPERSEDED also ends the event. With an older controller, which never
acks, an event is re-sent on reconnects for 5 minutes after a stream took it,
then dropped: the stream can break after the write returned but before the
controller committed it, and nothing better can be known.

The outbox survives an agent SIGKILL at any point: an event is written to a
temporary file, fsynced, renamed into place and the directory fsynced before
`publish_checkpoint` returns (the session manager deletes the session directory
right after); a kill before the rename leaves only a temporary file, which the
agent removes later, and the checkpoint's manifest is then still in the store but
not in the catalogue, just as for a kill before the manifest was written.

Connection visits (the connection audit, `publish_visit`) follow the same pattern with
an outbox of their own (agent/proxy/audit.py): the newest copy of each visit is kept
until the controller acks that copy, re-sent after the Inventory on each reconnect and
when its ack is a minute late. Only a controller whose Welcome sets
`connection_visits` is sent any; for an older one they wait in the (bounded) outbox.
The Hello carries the proxy's `proxy_instance_id`, by which the controller closes the
visits a previous run of the proxy left open.

Trust (agent/enrollment.py): every attempt first makes sure the agent has a
certificate (enrolling with the join token when it has none, or when it has expired),
asks the enrollment endpoint (`--controller`, server TLS with the pinned CA) where the
agent endpoint is, and opens the stream there over mutual TLS with that certificate.
The certificate is renewed on the agent endpoint once a third of its lifetime is left;
the stream then reconnects at once with the new one (sessions are not touched). A
revoked agent keeps trying, slowly, and says so in `studio-agent status`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from studios.agent.v1 import agent_pb2 as pb
from studios.agent.v1 import agent_pb2_grpc as pb_grpc

from agent import __version__
from agent.enrollment import (
    Credentials,
    Enroller,
    EnrollmentError,
    PkiFiles,
    agent_endpoint_target,
    describe_tls_failure,
    expiry_message,
    fetch_endpoints,
    not_after_text,
    renew,
    renewal_retry_delay,
    seconds_until,
)
from agent.host import host_capacity
from agent.proxy.audit import VisitOutbox
from agent.sessions import SessionManager
from agent.state import StateDir, atomic_write_bytes
from studios_shared.agent_pki import AgentIdentity

__all__ = ["PROTOCOL_VERSION", "ControllerLink", "Outbox", "runtime_kind"]

log = logging.getLogger(__name__)

_WELCOME_TIMEOUT = 30.0
# The protocol version this agent speaks (agent.proto ProtocolVersion): V2 has the
# runtime, volume kinds and mount states as enums. A controller older than V2
# refuses it: controllers are upgraded before agents.
PROTOCOL_VERSION = pb.PROTOCOL_VERSION_V2
# The runtime backends' names (agent/runtime/registry.py) as Hello.runtime_kind.
_RUNTIME_KIND = {
    "local": pb.RUNTIME_KIND_LOCAL,
    "podman": pb.RUNTIME_KIND_PODMAN,
}
# With a controller that does not ack (an older one): how long an event is re-sent
# on reconnects after a stream took it.
_OUTBOX_RESEND_SECONDS = 300.0
# With a controller that acks: an event whose ack is this late on a live stream
# goes again (its transaction may have failed; a copy is harmless).
_ACK_LATE_SECONDS = 60.0
# A temporary file of an interrupted `add` is this old before it is removed (an
# `add` in progress in another thread must not lose its file).
_STALE_TMP_SECONDS = 600.0


def runtime_kind(name: str) -> pb.RuntimeKind:
    """A runtime backend's name as the wire's enum (UNSPECIFIED for a name it lacks)."""
    return _RUNTIME_KIND.get(name, pb.RUNTIME_KIND_UNSPECIFIED)


def _digest(session_id: str, key: str) -> str:
    return hashlib.sha256(f"{session_id}\0{key}".encode()).hexdigest()[:24]


class Outbox:
    """Checkpoint events on disk, `<ns>-<digest>.pb`, until the controller acks them.

    `<ns>` (nanoseconds of the add) orders them; `<digest>` names the event's
    (session, key), which is what an ack names. With a controller that does not
    ack, an event taken by a stream becomes `.sent` and expires after a while.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def add(self, event: pb.CheckpointEvent) -> Path:
        path = self.directory / f"{time.time_ns():020d}-{_digest(event.session_id, event.key)}.pb"
        atomic_write_bytes(path, event.SerializeToString())
        # The rename must outlive a crash of the host too, not only of the agent.
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def pending(self, *, acks: bool = True) -> list[tuple[Path, pb.CheckpointEvent]]:
        """Every event to (re-)send, oldest first.

        With `acks` every event on disk is pending until acked; without, `.sent`
        ones are pending for the re-send window only and removed after it.
        """
        items = []
        now = time.time()
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith("."):
                # A temporary file of an add that a kill interrupted.
                with contextlib.suppress(FileNotFoundError):
                    if now - path.stat().st_mtime > _STALE_TMP_SECONDS:
                        path.unlink(missing_ok=True)
                continue
            if path.suffix == ".sent" and not acks:
                try:
                    if now - path.stat().st_mtime > _OUTBOX_RESEND_SECONDS:
                        path.unlink(missing_ok=True)
                        continue
                except FileNotFoundError:
                    continue
            elif path.suffix not in (".pb", ".sent"):
                continue
            event = pb.CheckpointEvent()
            try:
                event.ParseFromString(path.read_bytes())
            except FileNotFoundError:
                continue  # acked meanwhile
            except (OSError, DecodeError):
                # DecodeError is no ValueError: uncaught, one torn file failed every connect.
                log.warning("outbox: dropping unreadable %s", path)
                path.unlink(missing_ok=True)
                continue
            items.append((path, event))
        return items

    def ack(self, session_id: str, key: str) -> list[Path]:
        """Drop every copy of the event (session_id, key); the paths removed."""
        removed = []
        for path in self.directory.glob(f"*-{_digest(session_id, key)}.*"):
            if path.suffix in (".pb", ".sent") and not path.name.startswith("."):
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def mark_written(self, path: Path) -> None:
        """Only for a controller that does not ack: start the event's re-send window."""
        if path.suffix == ".pb":
            with contextlib.suppress(FileNotFoundError):
                sent = path.with_suffix(".sent")
                os.replace(path, sent)
                os.utime(sent)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)


class _Refused(Exception):
    """The controller will not take this agent as it is; the message says why and what to
    do. `slow`: retry at the longest backoff (nothing here will change soon)."""

    def __init__(self, message: str, *, slow: bool = False) -> None:
        super().__init__(message)
        self.slow = slow


class _Rotated(Exception):
    """The certificate was renewed: reconnect now with the new one."""


def split_targets(text: str) -> list[str]:
    """The controllers of `--controller` (HOST:PORT, comma-separated), in order."""
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets:
        raise ValueError(f"--controller: expected HOST:PORT[,HOST:PORT...], got {text!r}")
    return targets


class ControllerLink:
    def __init__(
        self,
        *,
        target: str,
        token_file: Path,
        agent_id: str,
        compute_env_id: str,
        runtime_name: str,
        proxy_url: str,
        manager: SessionManager,
        state: StateDir,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        capacity_interval: float = 60.0,
    ) -> None:
        self.targets = split_targets(target)
        self._target_index = 0
        self.token_file = token_file
        self.agent_id = agent_id
        self.compute_env_id = compute_env_id
        self.runtime_name = runtime_name
        self.proxy_url = proxy_url
        self.manager = manager
        self.state = state
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.capacity_interval = capacity_interval
        self.outbox = Outbox(state.outbox_dir)
        # Connection visits not acknowledged yet; the proxy's run id (Hello), set by the daemon.
        self.visits = VisitOutbox(state.root / "visits")
        self.proxy_instance_id = ""
        self.controller_visits = False
        # Visits written on this stream and not acked yet: visit id -> when.
        self._visits_unacked: dict[str, float] = {}
        self.connected = False
        self.last_error = ""
        self.connected_since = 0.0
        self.connects = 0
        self.heartbeat_interval = 10.0
        # From the Welcome of the current (or last) stream.
        self.controller_acks = False
        # Checkpoint events written on this stream and not acked yet: path -> when.
        self._unacked: dict[Path, float] = {}
        # The proxy reads this; kept on disk so it keeps working while disconnected.
        self.connect_token_key: bytes | None = state.load_connect_key()
        self.pki = PkiFiles(state)
        self.enroller = Enroller(target=self.target, token_file=token_file, pki=self.pki)
        # This agent's certificate once loaded or issued; where the agent endpoint is.
        self.credentials: Credentials | None = None
        self.agent_endpoint = ""
        self.renewals = 0
        # The controller's words when it last refused this agent as revoked.
        self.revoked = ""
        # Set by the daemon: the controller enrolled this agent under another id.
        self.on_agent_id: Callable[[str], None] | None = None
        self.connect_cookie_max_seconds = 0  # Welcome's bound on proxy cookies (0: not sent)
        # `studio-agent drain` (set by the daemon, through set_drain): in every Hello and
        # Heartbeat.
        self.drain: pb.DrainMode = pb.DRAIN_MODE_NONE
        self._queue: collections.OrderedDict[tuple[str, str], pb.ConnectRequest] = (
            collections.OrderedDict()
        )
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Set by the daemon: DesiredState for the proxy (full, sessions), and the
        # connections to report again after each (re)connect.
        # `on_desired` may return an awaitable: the proxy's worker processes acknowledging
        # the access lists, awaited before anything else of the message is acted on.
        self.on_desired: (
            Callable[[bool, list[pb.SessionDesired]], Awaitable[None] | None] | None
        ) = None
        self.connections_snapshot: Callable[[], list[pb.SessionConnections]] | None = None
        manager.on_observed = self.publish_observed
        manager.on_checkpoint = self.publish_checkpoint

    @property
    def target(self) -> str:
        """The controller (enrollment endpoint) this link talks to now."""
        return self.targets[self._target_index]

    def _next_target(self) -> bool:
        """Move on to the next controller of the list; True when that starts a new round."""
        self._target_index = (self._target_index + 1) % len(self.targets)
        self.enroller.target = self.target
        return self._target_index == 0

    # ------------------------------------------------------------ producers

    def _enqueue(self, key: tuple[str, str], msg: pb.ConnectRequest) -> None:
        # Re-queue at the end so a checkpoint event queued earlier goes out first
        # (FINALIZED must reach the controller before the STOPPED that follows it).
        self._queue.pop(key, None)
        self._queue[key] = msg
        self._wake.set()

    def publish_observed(self, obs: pb.SessionObserved) -> None:
        self._enqueue(("obs", obs.session_id), pb.ConnectRequest(session=obs))

    def publish_connections(self, conns: pb.SessionConnections) -> None:
        """Who is connected to a session (coalesced per session like observations)."""
        self._enqueue(("conn", conns.session_id), pb.ConnectRequest(connections=conns))

    def publish_visit(self, visit: pb.ConnectionVisit) -> None:
        """Hold the visit in the outbox and send it if the controller takes visits."""
        if self.visits.add(visit) and self.connected and self.controller_visits:
            self._enqueue(("visit", visit.visit_id), pb.ConnectRequest(visit=visit))

    def set_drain(self, mode: pb.DrainMode) -> None:
        """Begin, change or end draining: the controller hears of it at once."""
        self.drain = mode
        self._enqueue(("heartbeat", ""), self._heartbeat())

    def _heartbeat(self) -> pb.ConnectRequest:
        return pb.ConnectRequest(heartbeat=pb.Heartbeat(sent_at=int(time.time()), drain=self.drain))

    def publish_checkpoint(self, event: pb.CheckpointEvent) -> None:
        """Persist the event (fsynced) before returning, then queue it for the stream."""
        path = self.outbox.add(event)
        self._enqueue(("ckpt", str(path)), pb.ConnectRequest(checkpoint=event))

    def _capacity(self) -> pb.HostCapacity:
        return pb.HostCapacity(**host_capacity(self.state.root, self.manager.disk_budget_free()))

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="controller-link")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.connected = False

    def status(self) -> dict[str, Any]:
        creds = self.credentials
        return {
            "address": self.target,
            "controllers": list(self.targets),
            "agentEndpoint": self.agent_endpoint,
            "connected": self.connected,
            "connectedSince": int(self.connected_since) if self.connected else 0,
            "lastError": self.last_error,
            "connects": self.connects,
            "enrolled": creds is not None,
            "certificate": (
                {
                    "agentId": creds.identity.agent_id,
                    "computeEnv": creds.identity.compute_env_id,
                    "serial": format(creds.serial, "x"),
                    "notAfter": not_after_text(creds.not_after),
                    "renewAt": not_after_text(creds.renew_at),
                    "renewals": self.renewals,
                }
                if creds is not None
                else None
            ),
            "revoked": self.revoked,
            "connectionVisits": {"pending": len(self.visits), "dropped": self.visits.dropped},
        }

    async def _run(self) -> None:
        attempt = 0
        # Controllers that failed in a row since the last stream that came up.
        failed_in_row = 0
        while True:
            slow = False
            try:
                await self._connect_once()
                self.last_error = "controller closed the stream"
            except asyncio.CancelledError:
                raise
            except _Rotated:
                self.connected = False
                attempt = 0
                log.info("reconnecting to %s with the renewed certificate", self.target)
                continue
            except _Refused as exc:
                self.last_error = str(exc)
                slow = exc.slow
                log.error("%s", exc)
            except EnrollmentError as exc:
                self.last_error = str(exc)
                log.error("%s", exc)
            except grpc.aio.AioRpcError as exc:
                self.last_error = f"{exc.code().name}: {exc.details()}"
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    # The controller does not speak this agent's protocol version: an
                    # older controller (upgrade it first), or a much newer one.
                    self.last_error += (
                        f" (this agent {__version__} speaks protocol "
                        f"{pb.ProtocolVersion.Name(PROTOCOL_VERSION)}: upgrade the controller "
                        "before its agents)"
                    )
                    log.error("controller %s refused this agent: %s", self.target, self.last_error)
                else:
                    log.warning("controller link: %s", self.last_error)
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("controller link: %s", self.last_error)
            if self.connected:
                attempt = 0  # the stream was up: start over with a short delay
                failed_in_row = 0
            self.connected = False
            failed_in_row += 1
            if len(self.targets) > 1 and not slow and failed_in_row < len(self.targets):
                # Another controller may well be up: try it now, backing off only once
                # every one of them has failed in a row.
                previous = self.target
                self._next_target()
                log.info("controller %s failed; trying %s", previous, self.target)
                await asyncio.sleep(random.uniform(0, self.backoff_initial / 2))
                continue
            failed_in_row = 0
            self._next_target()
            delay = min(self.backoff_max, self.backoff_initial * 2**attempt)
            delay *= random.uniform(0.5, 1.0)
            if slow:
                delay = self.backoff_max
            attempt = min(attempt + 1, 30)
            log.info("reconnecting to %s in %.1f s", self.target, delay)
            await asyncio.sleep(delay)

    # ------------------------------------------------------------ trust

    def _adopt(self, creds: Credentials) -> None:
        """Use `creds` from now on; the agent id is the certificate's."""
        self.credentials = creds
        agent_id = creds.identity.agent_id
        if agent_id != self.agent_id:
            log.warning(
                "the controller enrolled this agent as %s (it asked for %s); kept in %s",
                agent_id,
                self.agent_id,
                self.state.agent_id_path,
            )
            self.state.save_agent_id(agent_id)
            self.agent_id = agent_id
            if self.on_agent_id is not None:
                self.on_agent_id(agent_id)

    async def _ensure_credentials(self) -> Credentials:
        """This agent's certificate: the stored one, else one from enrolling."""
        creds = self.credentials or await asyncio.to_thread(self.pki.load)
        why = ""
        agent_id = self.agent_id
        if creds is not None:
            if creds.identity.compute_env_id != self.compute_env_id:
                raise _Refused(
                    f"this agent's certificate names compute environment "
                    f"{creds.identity.compute_env_id}, but --compute-env is "
                    f"{self.compute_env_id}: to move the agent, revoke it on the controller, "
                    f"remove {self.state.pki_dir} and start it again with a join token",
                    slow=True,
                )
            if creds.expired():
                # The controller never enrolls an id again (revoked or not): a new id, and
                # the old one is the operator's to revoke.
                agent_id = uuid.uuid4().hex
                why = (
                    f"{expiry_message(creds)} (the agent was down too long to renew it); "
                    f"enrolling again with the join token as agent {agent_id} (revoke the "
                    f"old one: studio-controller agent revoke {creds.identity.agent_id})"
                )
                log.warning("%s", why)
                creds = None
        if creds is None:
            creds = await self.enroller.enroll(
                AgentIdentity(agent_id, self.compute_env_id),
                socket.gethostname(),
                self._capacity(),
                why,
            )
        self._adopt(creds)
        return creds

    def _refusal(self, exc: grpc.aio.AioRpcError, target: str) -> Exception:
        """What a failed RPC on the agent endpoint (or Endpoints) means for the operator."""
        tls = describe_tls_failure(exc, target)
        if tls is not None:
            return _Refused(tls)
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details.lower():
            self.revoked = details
            return _Refused(
                f"controller {self.target} refused this agent: it is revoked "
                f"(UNAUTHENTICATED: {details}). Retrying every {self.backoff_max:.0f} s; to "
                f"enroll this host again (a revoked id never comes back), remove "
                f"{self.state.pki_dir} and {self.state.agent_id_path} and restart the agent "
                "with a valid join token",
                slow=True,
            )
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return _Refused(
                f"controller {self.target} refused this agent's certificate "
                f"({code.name}: {details}); retrying"
            )
        return exc

    async def _renew(self, channel: grpc.aio.Channel, creds: Credentials) -> Credentials:
        key_pem, cert_pem = await renew(channel, creds.identity)
        new = await asyncio.to_thread(self.pki.store, creds.ca_pem, key_pem, cert_pem)
        self.renewals += 1
        log.info(
            "certificate renewed (serial %x, valid until %s)",
            new.serial,
            not_after_text(new.not_after),
        )
        self._adopt(new)
        return new

    async def _renewer(self, channel: grpc.aio.Channel, creds: Credentials) -> None:
        """Renew the stream's certificate when it is due, then end the stream (_Rotated).

        A renewal that fails leaves the stream up (the controller checks certificates at
        the handshake only) and is tried again; once the certificate has expired that can
        only fail, and the next connect enrolls again."""
        while True:
            await asyncio.sleep(seconds_until(creds.renew_at))
            try:
                await self._renew(channel, creds)
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, EnrollmentError) as exc:
                reason = (
                    f"{exc.code().name}: {exc.details()}"
                    if isinstance(exc, grpc.aio.AioRpcError)
                    else str(exc)
                )
                delay = renewal_retry_delay(creds)
                self.last_error = f"renewing this agent's certificate failed ({reason})"
                if creds.expired():
                    self.last_error = f"{expiry_message(creds)}; {self.last_error}"
                log.warning("%s; trying again in %.0f s", self.last_error, delay)
                await asyncio.sleep(delay)
                continue
            raise _Rotated()

    async def _connect_once(self) -> None:
        creds = await self._ensure_credentials()
        try:
            endpoints = await fetch_endpoints(self.target, creds.ca_pem)
        except grpc.aio.AioRpcError as exc:
            raise self._refusal(exc, self.target) from None
        target = agent_endpoint_target(self.target, endpoints.agent_endpoint)
        self.agent_endpoint = target
        if creds.renewal_due():
            # The agent was down when it was due: renew before the stream.
            async with grpc.aio.secure_channel(target, creds.channel_credentials()) as channel:
                try:
                    creds = await self._renew(channel, creds)
                except grpc.aio.AioRpcError as exc:
                    refusal = self._refusal(exc, target)
                    if refusal is not exc:
                        raise refusal from None
                    # Still valid: connect with it; the stream's renewer tries again.
                    log.warning(
                        "renewing this agent's certificate failed (%s: %s); connecting with "
                        "the current one",
                        exc.code().name,
                        exc.details(),
                    )
        async with grpc.aio.secure_channel(target, creds.channel_credentials()) as channel:
            # grpcio-tools writes the service stub without annotations (no .pyi for it).
            stub = pb_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
            call = stub.Connect()
            try:
                await self._session(call, lambda: self._renewer(channel, creds))
            except grpc.aio.AioRpcError as exc:
                raise self._refusal(exc, target) from None
            finally:
                call.cancel()

    async def _session(
        self, call: Any, renewer: Callable[[], Coroutine[Any, Any, None]] | None = None
    ) -> None:
        hello = pb.Hello(
            protocol_version=PROTOCOL_VERSION,
            agent_id=self.agent_id,
            hostname=socket.gethostname(),
            compute_env_id=self.compute_env_id,
            runtime_kind=runtime_kind(self.runtime_name),
            proxy_url=self.proxy_url,
            agent_version=__version__,
            capacity=self._capacity(),
            proxy_instance_id=self.proxy_instance_id,
            drain=self.drain,
        )
        await call.write(pb.ConnectRequest(hello=hello))
        # Not asyncio.wait_for: on 3.11 it swallows a cancellation that arrives as the read
        # completes (the Welcome and `close()` together), and the link then never ends.
        async with asyncio.timeout(_WELCOME_TIMEOUT):
            first = await call.read()
        if first is grpc.aio.EOF:
            # The status (e.g. UNAUTHENTICATED) is only known once the call ends.
            code = await call.code()
            details = await call.details()
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
        if not first.HasField("welcome"):
            raise ConnectionError("controller did not answer Hello with Welcome")
        self._on_welcome(first.welcome)
        self.connected = True
        self.connected_since = time.time()
        self.connects += 1
        self.last_error = ""
        self.revoked = ""
        log.info(
            "connected to controller %s (agent endpoint %s) as agent %s",
            self.target,
            self.agent_endpoint,
            self.agent_id,
        )

        # Resync: the inventory carries the newest state of every session, so the
        # coalesced observations are obsolete; unacknowledged checkpoints go again, and
        # before the inventory: a stop finished while the stream was down reports
        # `stopped` there, and the controller must have its final checkpoint by then (a
        # start right after would otherwise restore the checkpoint before it).
        self._queue.clear()
        self._unacked.clear()
        self._visits_unacked.clear()
        inventory = self.manager.inventory()
        pending = await asyncio.to_thread(self.outbox.pending, acks=self.controller_acks)
        for path, event in pending:
            self._queue[("ckpt", str(path))] = pb.ConnectRequest(checkpoint=event)
        self._queue[("inventory", "")] = pb.ConnectRequest(inventory=inventory)
        if self.controller_visits:
            for visit in self.visits.pending():
                self._queue[("visit", visit.visit_id)] = pb.ConnectRequest(visit=visit)
        # After the inventory (the controller takes connections only of running studios).
        if self.connections_snapshot is not None:
            for conns in self.connections_snapshot():
                self._queue[("conn", conns.session_id)] = pb.ConnectRequest(connections=conns)
        self._wake.set()

        tasks = [
            asyncio.create_task(self._reader(call), name="link-reader"),
            asyncio.create_task(self._writer(call), name="link-writer"),
            asyncio.create_task(self._ticker(), name="link-ticker"),
        ]
        if renewer is not None:
            tasks.append(asyncio.create_task(renewer(), name="link-renewer"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _on_welcome(self, welcome: pb.Welcome) -> None:
        if welcome.checkpoint_acks != self.controller_acks:
            log.info(
                "controller %s checkpoint events",
                "acknowledges" if welcome.checkpoint_acks else "does not acknowledge",
            )
        self.controller_acks = welcome.checkpoint_acks
        self.controller_visits = welcome.connection_visits
        if welcome.heartbeat_interval_seconds > 0:
            self.heartbeat_interval = float(welcome.heartbeat_interval_seconds)
        self.connect_cookie_max_seconds = welcome.connect_cookie_max_seconds
        if welcome.connect_token_key and welcome.connect_token_key != self.connect_token_key:
            self.connect_token_key = bytes(welcome.connect_token_key)
            self.state.save_connect_key(self.connect_token_key)

    async def _reader(self, call: Any) -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                return
            kind = msg.WhichOneof("message")
            if kind == "welcome":
                self._on_welcome(msg.welcome)
            elif kind == "checkpoint_ack":
                await self._on_ack(msg.checkpoint_ack)
            elif kind == "visit_ack":
                self._on_visit_ack(msg.visit_ack)
            elif kind == "desired":
                sessions = list(msg.desired.sessions)
                if self.on_desired is not None:
                    # Access first: a narrowed list must not wait for the reconciler.
                    try:
                        applied = self.on_desired(msg.desired.full, sessions)
                        if applied is not None:
                            # Every proxy process enforces a narrowed list before the
                            # next message is read (a worker that does not acknowledge
                            # within its bound is killed, its connections with it).
                            await applied
                    except Exception:
                        log.exception("applying the proxy's access lists failed")
                self.manager.apply_desired(msg.desired.full, sessions)

    async def _writer(self, call: Any) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            key, msg = self._queue.popitem(last=False)
            try:
                await call.write(msg)
            except BaseException:
                if key not in self._queue:
                    self._queue[key] = msg
                    self._queue.move_to_end(key, last=False)
                raise
            if key[0] == "visit":
                self._visits_unacked[key[1]] = time.monotonic()
            elif key[0] == "ckpt":
                if self.controller_acks:
                    self._unacked[Path(key[1])] = time.monotonic()
                else:
                    await asyncio.to_thread(self.outbox.mark_written, Path(key[1]))

    async def _on_ack(self, ack: pb.CheckpointAck) -> None:
        removed = await asyncio.to_thread(self.outbox.ack, ack.session_id, ack.key)
        for path in removed:
            self._unacked.pop(path, None)
            self._queue.pop(("ckpt", str(path)), None)  # a copy not sent yet
        if ack.result == pb.CHECKPOINT_ACK_RESULT_REFUSED:
            log.warning(
                "controller refused checkpoint %s of session %s for good (%s); not re-sent",
                ack.key,
                ack.session_id,
                ack.message or "no reason given",
            )
        elif ack.result == pb.CHECKPOINT_ACK_RESULT_SUPERSEDED:
            log.info(
                "checkpoint %s of session %s superseded: %s", ack.key, ack.session_id, ack.message
            )
        else:
            log.debug("checkpoint %s of session %s acknowledged", ack.key, ack.session_id)

    def _on_visit_ack(self, ack: pb.ConnectionVisitAck) -> None:
        if not self.visits.ack(ack.visit_id, ack.closed_at_ms):
            return  # an ack of a copy since replaced (the open, once the close is held)
        self._visits_unacked.pop(ack.visit_id, None)
        if ack.refused:
            log.warning(
                "controller refused connection visit %s for good (%s); not re-sent",
                ack.visit_id,
                ack.message or "no reason given",
            )

    def _resend_late_visits(self) -> None:
        """Queue again the visits whose ack is late on this stream."""
        now = time.monotonic()
        for visit_id, sent in list(self._visits_unacked.items()):
            if now - sent <= _ACK_LATE_SECONDS:
                continue
            del self._visits_unacked[visit_id]
            visit = self.visits.get(visit_id)
            if visit is not None:
                log.info("connection visit %s: no ack yet, sent again", visit_id)
                self._enqueue(("visit", visit_id), pb.ConnectRequest(visit=visit))

    async def _resend_late(self) -> None:
        """Queue again the events whose ack is late on this stream (oldest first)."""
        now = time.monotonic()
        late = {p for p, t in self._unacked.items() if now - t > _ACK_LATE_SECONDS}
        if not late:
            return
        for path, event in await asyncio.to_thread(self.outbox.pending, acks=True):
            if path in late:
                del self._unacked[path]
                log.info(
                    "checkpoint %s of session %s: no ack yet, sent again",
                    event.key,
                    event.session_id,
                )
                self._enqueue(("ckpt", str(path)), pb.ConnectRequest(checkpoint=event))
        for path in late & set(self._unacked):
            del self._unacked[path]  # acked meanwhile

    async def _ticker(self) -> None:
        next_capacity = time.monotonic() + self.capacity_interval
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            self._enqueue(("heartbeat", ""), self._heartbeat())
            if self.controller_acks:
                await self._resend_late()
            if self.controller_visits:
                self._resend_late_visits()
            if time.monotonic() >= next_capacity:
                next_capacity = time.monotonic() + self.capacity_interval
                self._enqueue(("capacity", ""), pb.ConnectRequest(capacity=self._capacity()))
