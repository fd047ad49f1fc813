"""The agent's side of the proxy worker processes (`--proxy-workers N`).

With N > 1 the agent's own `ConnectProxy` listens with SO_REUSEPORT and N - 1 worker
processes (`agent.proxy.worker`, children of the agent) join it on the same port; the
kernel spreads new connections over the N listeners. The hard `nofile` limit is per
process, so N processes hold N times the connections (a proxied WebSocket costs two
descriptors), and the relaying runs on N cores.

Exactness across processes:
- Revocation: `apply_desired_access` narrows the agent's proxy at once and sends every
  worker the whole access table; `push_access` returns once every worker acknowledged
  it (a worker that does not within `ACK_SECONDS` is killed, which ends its
  connections). A worker listens only after it has its first table.
- Single-use connect tokens: a worker asks the agent's proxy whether a nonce is new.
- Who is connected (`activeConnections`): the workers report their users per session
  when that changes (every `REPORT_SECONDS` at most) and the agent's proxy lists the
  union (`ConnectProxy.active_users`), for the admin `connections` and the controller.
- The audit: a worker's visits carry the agent proxy's instance id and are reported
  through the agent; the visits of a worker that died are closed by the agent.

A worker that dies is restarted after `RESTART_SECONDS` (its connections are lost); the
agent closing stops its workers; a SIGKILLed agent takes them along (PR_SET_PDEATHSIG,
and the end of the control channel).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from google.protobuf.message import DecodeError
from studios.agent.v1 import agent_pb2 as pb

from agent.proxy.control import ControlError, encode, read_message
from agent.proxy.server import ConnectProxy, ProxiedSession, ProxyStats, UserActivity

__all__ = ["ACK_SECONDS", "RESTART_SECONDS", "ProxyWorkers", "WorkerError"]

log = logging.getLogger(__name__)

ACK_SECONDS = 5.0
RESTART_SECONDS = 0.5
START_SECONDS = 30.0
STATE_SECONDS = 0.2


class WorkerError(Exception):
    """The worker processes could not be started."""


class _Worker:
    def __init__(self, name: str) -> None:
        self.name = name
        self.process: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.listening = asyncio.Event()
        self.acks: dict[int, asyncio.Future[None]] = {}
        # Visits opened on this worker and not closed yet (closed here if it dies).
        self.open_visits: dict[str, pb.ConnectionVisit] = {}
        self.started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def send(self, message: dict[str, Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(encode(message))


class ProxyWorkers:
    def __init__(
        self,
        proxy: ConnectProxy,
        *,
        count: int,
        host: str,
        port: int,
        sessions: Callable[[], Iterable[tuple[str, ProxiedSession]]],
        splice: bool = False,
    ) -> None:
        self.proxy = proxy
        self.host, self.port = host, port
        self.splice = splice
        self._sessions = sessions
        self.workers = [_Worker(f"worker {i + 1}") for i in range(count)]
        self.restarts = 0
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._state_task: asyncio.Task[None] | None = None
        self._state_message: dict[str, Any] = {}
        self._next_ack = 0

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid is not None and w.listening.is_set()]

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the workers; return once each listens on the port."""
        self._state_message = self._state()
        for worker in self.workers:
            self._tasks.append(asyncio.create_task(self._supervise(worker)))
        self._state_task = asyncio.create_task(self._state_loop())
        waits = [asyncio.create_task(w.listening.wait()) for w in self.workers]
        _done, pending = await asyncio.wait(waits, timeout=START_SECONDS)
        for task in pending:
            task.cancel()
        if pending:
            await self.close()
            raise WorkerError(
                f"{len(pending)} of {len(self.workers)} proxy worker(s) did not listen on "
                f"{self.host}:{self.port} within {START_SECONDS:.0f} s (see their log lines)"
            )

    async def close(self) -> None:
        """Stop the workers: each closes its connections and reports its visits."""
        self._closing = True
        for worker in self.workers:
            writer = worker.writer
            if writer is not None and not writer.is_closing() and writer.can_write_eof():
                # Half-closed: the worker sees the end, closes its connections and
                # reports its visits on the way still open towards the agent. (uvloop
                # raises where the channel broke meanwhile; asyncio's loop ignores it.)
                with contextlib.suppress(RuntimeError, OSError):
                    writer.write_eof()
        if self._state_task is not None:
            self._state_task.cancel()
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                log.warning("proxy %s (pid %d) did not stop: killed", worker.name, process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        tasks = [*self._tasks, *([self._state_task] if self._state_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def _spawn(
        self, worker: _Worker
    ) -> tuple[asyncio.StreamReader, asyncio.subprocess.Process]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent.proxy.worker",
                "--control-fd",
                str(theirs.fileno()),
                "--parent-pid",
                str(os.getpid()),
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--instance-id",
                self.proxy.instance_id,
                "--relay",
                "splice" if self.splice else "copy",
                "--name",
                worker.name,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        worker.process, worker.writer = process, writer
        worker.started_at = time.monotonic()
        # What it must know before it may listen: the sessions, then the access lists.
        worker.send(self._state_message)
        worker.send({"t": "access", "id": 0, "access": self._access_table()})
        return reader, process

    async def _supervise(self, worker: _Worker) -> None:
        while not self._closing:
            try:
                reader, process = await self._spawn(worker)
            except OSError as exc:
                log.error("cannot start proxy %s: %s", worker.name, exc)
                await asyncio.sleep(RESTART_SECONDS * 4)
                continue
            try:
                await self._read(worker, reader)
            except (ControlError, OSError) as exc:
                # OSError: a reset (the worker killed with our messages unread), which
                # uvloop reports where asyncio's loop mostly sees a plain end.
                log.error("proxy %s: control channel broken: %s", worker.name, exc)
            if worker.writer is not None:
                worker.writer.close()
            if not self._closing and process.returncode is None:
                # Its channel is gone: it cannot be told of revocations any more.
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            code = await process.wait()
            self._ended(worker)
            if self._closing:
                return
            log.warning(
                "proxy %s (pid %d) ended (exit status %d): its connections are lost; restarting it",
                worker.name,
                process.pid,
                code,
            )
            self.restarts += 1
            await asyncio.sleep(RESTART_SECONDS)

    def _ended(self, worker: _Worker) -> None:
        worker.listening.clear()
        worker.writer = None
        for future in worker.acks.values():
            if not future.done():
                future.set_result(None)  # nothing of it is left to narrow
        worker.acks.clear()
        now = time.time()
        for visit in worker.open_visits.values():
            closed = pb.ConnectionVisit()
            closed.CopyFrom(visit)
            closed.closed_at_ms = int(now * 1000)
            self.proxy._report_visit(closed)
        worker.open_visits.clear()
        self.proxy.forget_worker(worker.name)

    # ------------------------------------------------------------ from a worker

    async def _read(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                message = await read_message(reader)
            except ValueError as exc:
                log.warning("proxy %s: dropped a message that is not JSON: %s", worker.name, exc)
                continue
            if message is None:
                return
            try:
                self._handle(worker, message)
            except (KeyError, TypeError, ValueError, DecodeError) as exc:
                log.warning("proxy %s: dropped a malformed message: %s", worker.name, exc)

    def _handle(self, worker: _Worker, message: Any) -> None:
        kind = message["t"]
        if kind == "activity":
            users = [
                UserActivity(int(uid), str(name), int(conns), float(last), int(tunnels))
                for uid, name, conns, last, tunnels in message["users"]
            ]
            self.proxy.set_remote_activity(worker.name, str(message["sid"]), users)
        elif kind == "stats":
            connections, from_clients, to_clients, spliced, open_now = (
                int(v) for v in message["v"]
            )
            self.proxy.set_remote_stats(
                worker.name, ProxyStats(connections, from_clients, to_clients, spliced), open_now
            )
        elif kind == "visit":
            visit = pb.ConnectionVisit()
            visit.ParseFromString(base64.b64decode(message["pb"], validate=True))
            if visit.closed_at_ms:
                worker.open_visits.pop(visit.visit_id, None)
            else:
                worker.open_visits[visit.visit_id] = visit
            self.proxy._report_visit(visit)
        elif kind == "nonce":
            ok = self.proxy.claim_nonce(str(message["nonce"]), float(message["expiresAt"]))
            worker.send({"t": "nonce", "id": int(message["id"]), "ok": ok})
        elif kind == "ack":
            future = worker.acks.pop(int(message["id"]), None)
            if future is not None and not future.done():
                future.set_result(None)
        elif kind == "listening":
            log.info("proxy %s (pid %s) listening", worker.name, message.get("pid"))
            worker.listening.set()
        else:
            raise ValueError(f"unknown message type {kind!r}")

    # ------------------------------------------------------------ to the workers

    def _state(self) -> dict[str, Any]:
        key = self.proxy._key()
        cookie_max = self.proxy._cookie_max() if self.proxy._cookie_max is not None else None
        return {
            "t": "state",
            "sessions": {
                sid: [h.status, int(h.port or 0), h.proxy_secret or ""]
                for sid, h in self._sessions()
            },
            "key": base64.b64encode(key).decode() if key is not None else None,
            "cookieMax": cookie_max,
        }

    def push_state(self) -> None:
        """Send the session table, key and cookie bound to the workers if they changed
        (the agent calls it on every session observation: a worker ends the connections
        of a session that stopped as soon as it hears of it)."""
        try:
            state = self._state()
        except Exception:  # pragma: no cover - never let the caller fail for it
            log.exception("reading the sessions for the proxy workers failed")
            return
        if state != self._state_message:
            self._state_message = state
            for worker in self.workers:
                worker.send(state)

    async def _state_loop(self) -> None:
        """Also polled: the key and the cookie bound come from the controller link, and a
        change not observed as a session's (a port) still reaches the workers within
        this period."""
        while True:
            await asyncio.sleep(STATE_SECONDS)
            self.push_state()

    def _access_table(self) -> dict[str, list[int]]:
        return {sid: sorted(users) for sid, users in self.proxy.access_table().items()}

    def apply_desired_access(self, full: bool, sessions: Iterable[pb.SessionDesired]) -> None:
        """`ConnectProxy.apply_desired_access` here and, right away, in every worker."""
        self.proxy.apply_desired_access(full, sessions)
        task = asyncio.get_running_loop().create_task(self.push_access())
        self._tasks.append(task)
        task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def apply_desired_access_and_wait(
        self, full: bool, sessions: Iterable[pb.SessionDesired]
    ) -> None:
        """Apply the access lists and return once every process enforces them."""
        self.proxy.apply_desired_access(full, sessions)
        await self.push_access()

    async def push_access(self) -> None:
        """Send the access table to every worker; return once each acknowledged it (or
        was killed for not doing so in time: its connections end with it)."""
        table = self._access_table()
        self._next_ack += 1
        waits: list[tuple[_Worker, asyncio.Future[None]]] = []
        loop = asyncio.get_running_loop()
        for worker in self.workers:
            if worker.writer is None or worker.writer.is_closing():
                continue  # not running: it gets the table when it starts
            future: asyncio.Future[None] = loop.create_future()
            worker.acks[self._next_ack] = future
            worker.send({"t": "access", "id": self._next_ack, "access": table})
            waits.append((worker, future))
        for worker, future in waits:
            try:
                await asyncio.wait_for(asyncio.shield(future), ACK_SECONDS)
            except TimeoutError:
                log.error(
                    "proxy %s did not apply an access list within %.0f s: killed",
                    worker.name,
                    ACK_SECONDS,
                )
                if worker.process is not None:
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.send_signal(signal.SIGKILL)
                    await worker.process.wait()
