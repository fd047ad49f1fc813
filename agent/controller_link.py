"""The agent's one long-lived gRPC stream to the controller.

On every (re)connect: Hello, wait for Welcome, then a full Inventory, then every
checkpoint event the controller has not acknowledged, then who is connected to each session
(the controller forgets that when a stream ends); after that SessionObserved on each
change, HostCapacity periodically and Heartbeat at the interval Welcome asks for.
Every DesiredState goes to the session manager and to `on_desired` (the proxy's
access lists, which apply to running sessions whatever their generation).
Reconnects with exponential backoff and jitter.

What happens while disconnected: observations are coalesced to the newest per
session (the Inventory sent on reconnect carries the latest state anyway), while
checkpoint events are kept on disk in an outbox (`Outbox`).

Checkpoint events are acknowledged. A controller whose Welcome sets
`checkpoint_acks` answers each event with a CheckpointAck once the transaction
that recorded it has committed; the outbox drops an event only on that ack,
never on send, and every unacknowledged event goes again after the Inventory on
each reconnect (oldest first), and on a live stream when its ack is more than a
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from studios.agent.v1 import agent_pb2 as pb
from studios.agent.v1 import agent_pb2_grpc as pb_grpc

from agent import __version__
from agent.host import host_capacity
from agent.sessions import SessionManager
from agent.state import StateDir, atomic_write_bytes

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
            except (OSError, ValueError):
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


class _Unauthenticated(Exception):
    pass


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
        self.target = target
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
        self.connect_cookie_max_seconds = 0  # Welcome's bound on proxy cookies (0: not sent)
        self._queue: collections.OrderedDict[tuple[str, str], pb.ConnectRequest] = (
            collections.OrderedDict()
        )
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Set by the daemon: DesiredState for the proxy (full, sessions), and the
        # connections to report again after each (re)connect.
        self.on_desired: Callable[[bool, list[pb.SessionDesired]], None] | None = None
        self.connections_snapshot: Callable[[], list[pb.SessionConnections]] | None = None
        manager.on_observed = self.publish_observed
        manager.on_checkpoint = self.publish_checkpoint

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
        return {
            "address": self.target,
            "connected": self.connected,
            "connectedSince": int(self.connected_since) if self.connected else 0,
            "lastError": self.last_error,
            "connects": self.connects,
        }

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._connect_once()
                self.last_error = "controller closed the stream"
            except asyncio.CancelledError:
                raise
            except _Unauthenticated as exc:
                self.last_error = str(exc)
                log.error("%s", exc)
            except grpc.aio.AioRpcError as exc:
                self.last_error = f"{exc.code().name}: {exc.details()}"
                if exc.code() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                ):
                    log.error(
                        "controller %s refused this agent's token (%s: %s); check --token-file "
                        "%s; retrying",
                        self.target,
                        exc.code().name,
                        exc.details(),
                        self.token_file,
                    )
                elif exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
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
            self.connected = False
            delay = min(self.backoff_max, self.backoff_initial * 2**attempt)
            delay *= random.uniform(0.5, 1.0)
            attempt = min(attempt + 1, 30)
            log.info("reconnecting to %s in %.1f s", self.target, delay)
            await asyncio.sleep(delay)

    def _read_token(self) -> str:
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise _Unauthenticated(f"cannot read token file {self.token_file}: {exc}") from None
        if not token:
            raise _Unauthenticated(f"token file {self.token_file} is empty")
        return token

    async def _connect_once(self) -> None:
        token = await asyncio.to_thread(self._read_token)
        async with grpc.aio.insecure_channel(self.target) as channel:
            # grpcio-tools writes the service stub without annotations (no .pyi for it).
            stub = pb_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
            call = stub.Connect(metadata=(("authorization", f"Bearer {token}"),))
            try:
                await self._session(call)
            finally:
                call.cancel()

    async def _session(self, call: Any) -> None:
        hello = pb.Hello(
            protocol_version=PROTOCOL_VERSION,
            agent_id=self.agent_id,
            hostname=socket.gethostname(),
            compute_env_id=self.compute_env_id,
            runtime_kind=runtime_kind(self.runtime_name),
            proxy_url=self.proxy_url,
            agent_version=__version__,
            capacity=self._capacity(),
        )
        await call.write(pb.ConnectRequest(hello=hello))
        first = await asyncio.wait_for(call.read(), timeout=_WELCOME_TIMEOUT)
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
        log.info("connected to controller %s as agent %s", self.target, self.agent_id)

        # Resync: the inventory carries the newest state of every session, so the
        # coalesced observations are obsolete; unacknowledged checkpoints go again.
        self._queue.clear()
        self._unacked.clear()
        inventory = self.manager.inventory()
        pending = await asyncio.to_thread(self.outbox.pending, acks=self.controller_acks)
        for path, event in pending:
            self._queue[("ckpt", str(path))] = pb.ConnectRequest(checkpoint=event)
        # After the inventory (the controller takes connections only of running studios).
        if self.connections_snapshot is not None:
            for conns in self.connections_snapshot():
                self._queue[("conn", conns.session_id)] = pb.ConnectRequest(connections=conns)
        await call.write(pb.ConnectRequest(inventory=inventory))

        tasks = [
            asyncio.create_task(self._reader(call), name="link-reader"),
            asyncio.create_task(self._writer(call), name="link-writer"),
            asyncio.create_task(self._ticker(), name="link-ticker"),
        ]
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
            elif kind == "desired":
                sessions = list(msg.desired.sessions)
                if self.on_desired is not None:
                    # Access first: a narrowed list must not wait for the reconciler.
                    try:
                        self.on_desired(msg.desired.full, sessions)
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
            if key[0] == "ckpt":
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
            self._enqueue(
                ("heartbeat", ""),
                pb.ConnectRequest(heartbeat=pb.Heartbeat(sent_at=int(time.time()))),
            )
            if self.controller_acks:
                await self._resend_late()
            if time.monotonic() >= next_capacity:
                next_capacity = time.monotonic() + self.capacity_interval
                self._enqueue(("capacity", ""), pb.ConnectRequest(capacity=self._capacity()))
