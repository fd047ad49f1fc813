"""The agent's one long-lived gRPC stream to the controller.

On every (re)connect: Hello, wait for Welcome, then a full Inventory, then every
checkpoint event the stream has not taken yet, then who is connected to each session
(the controller forgets that when a stream ends); after that SessionObserved on each
change, HostCapacity periodically and Heartbeat at the interval Welcome asks for.
Every DesiredState goes to the session manager and to `on_desired` (the proxy's
access lists, which apply to running sessions whatever their generation).
Reconnects with exponential backoff and jitter.

What happens while disconnected: observations are coalesced to the newest per
session (the Inventory sent on reconnect carries the latest state anyway), while
checkpoint events are kept on disk in an outbox and re-sent on every reconnect for
a while after the stream took them (they are idempotent by key), so a checkpoint
the controller did not record can still reach it after a broken stream.
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

__all__ = ["ControllerLink", "Outbox"]

log = logging.getLogger(__name__)

_WELCOME_TIMEOUT = 30.0
# How long a checkpoint event is re-sent on reconnects after a stream took it: the
# protocol has no acknowledgement, and a stream can break after the write returned
# but before the controller committed the event.
_OUTBOX_RESEND_SECONDS = 300.0


class Outbox:
    """Checkpoint events on disk: `<ns>-<hash>.pb` until written, then `.sent`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def add(self, event: pb.CheckpointEvent) -> Path:
        digest = hashlib.sha256(f"{event.session_id}\0{event.key}".encode()).hexdigest()[:24]
        path = self.directory / f"{time.time_ns():020d}-{digest}.pb"
        atomic_write_bytes(path, event.SerializeToString())
        return path

    def pending(self) -> list[tuple[Path, pb.CheckpointEvent]]:
        """Every event still to be (re-)sent, oldest first; prunes old `.sent` ones."""
        items = []
        now = time.time()
        for path in sorted(self.directory.iterdir()):
            if path.suffix == ".sent":
                try:
                    if now - path.stat().st_mtime > _OUTBOX_RESEND_SECONDS:
                        path.unlink(missing_ok=True)
                        continue
                except FileNotFoundError:
                    continue
            elif path.suffix != ".pb":
                continue
            event = pb.CheckpointEvent()
            try:
                event.ParseFromString(path.read_bytes())
            except (OSError, ValueError):
                log.warning("outbox: dropping unreadable %s", path)
                path.unlink(missing_ok=True)
                continue
            items.append((path, event))
        return items

    def mark_written(self, path: Path) -> None:
        if path.suffix == ".pb":
            with contextlib.suppress(FileNotFoundError):
                sent = path.with_suffix(".sent")
                os.replace(path, sent)
                os.utime(sent)  # the re-send window starts when the stream took it
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
        # The proxy reads this; kept on disk so it keeps working while disconnected.
        self.connect_token_key: bytes | None = state.load_connect_key()
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
                    log.error("controller %s refused this agent: %s", self.target, exc.details())
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
            stub = pb_grpc.AgentServiceStub(channel)
            call = stub.Connect(metadata=(("authorization", f"Bearer {token}"),))
            try:
                await self._session(call)
            finally:
                call.cancel()

    async def _session(self, call: Any) -> None:
        hello = pb.Hello(
            protocol_version=pb.PROTOCOL_VERSION_V1,
            agent_id=self.agent_id,
            hostname=socket.gethostname(),
            compute_env_id=self.compute_env_id,
            runtime=self.runtime_name,
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
        inventory = self.manager.inventory()
        for path, event in await asyncio.to_thread(self.outbox.pending):
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
        if welcome.heartbeat_interval_seconds > 0:
            self.heartbeat_interval = float(welcome.heartbeat_interval_seconds)
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
                await asyncio.to_thread(self.outbox.mark_written, Path(key[1]))

    async def _ticker(self) -> None:
        next_capacity = time.monotonic() + self.capacity_interval
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            self._enqueue(
                ("heartbeat", ""),
                pb.ConnectRequest(heartbeat=pb.Heartbeat(sent_at=int(time.time()))),
            )
            if time.monotonic() >= next_capacity:
                next_capacity = time.monotonic() + self.capacity_interval
                self._enqueue(("capacity", ""), pb.ConnectRequest(capacity=self._capacity()))
