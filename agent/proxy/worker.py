"""A connect-proxy worker process: one more `ConnectProxy` on the agent's proxy port.

Started by the agent (`ProxyWorkers`, `--proxy-workers N`) as
`python -m agent.proxy.worker --control-fd FD ...`; FD is its end of a socketpair (see
`agent.proxy.control`). The kernel spreads new client connections over the agent's
proxy and its workers (SO_REUSEPORT), so the descriptors of many connections are spread
over several processes and the relaying over several cores.

What a worker knows comes from the agent over that channel only: the sessions (status,
tool port, proxy secret), the connect key and the cookie bound, and the access lists. It
listens only once it has the first copy of all of them, and it acknowledges each access
list, so that the agent can tell when a revocation holds everywhere. A connect token's
nonce is checked by the agent (single use across processes). The worker reports back
who is connected to what (`activity`), its visits for the audit, and its totals.

A message that is not understood is logged and dropped; a broken stream, or its end
(the agent stopped or died), ends the worker. The worker also asks the kernel to kill it
when the agent dies (PR_SET_PDEATHSIG), so that no worker outlives a SIGKILLed agent
while still holding the port.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import logging
import os
import resource
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any

from studios.agent.v1 import agent_pb2 as pb

from agent.proxy.control import ControlError, encode, read_message
from agent.proxy.loop import run
from agent.proxy.server import ConnectProxy

__all__ = ["REPORT_SECONDS", "main"]

log = logging.getLogger("agent.proxy.worker")

# How often a worker sends what changed in who is connected, and its totals.
REPORT_SECONDS = 0.25
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class _Session:
    status: str
    port: int
    proxy_secret: str


class _BadMessage(Exception):
    pass


def _field(message: dict[str, Any], name: str, kind: type) -> Any:
    value = message.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _BadMessage(f"field {name!r}: expected {kind.__name__}, got {value!r}")
    return value


class Worker:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        instance_id: str,
        splice: bool,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.sessions: dict[str, _Session] = {}
        self.key: bytes | None = None
        self.cookie_max: float | None = None
        self.proxy = ConnectProxy(
            lookup=self.sessions.get,
            key=lambda: self.key,
            cookie_max=lambda: self.cookie_max,
            on_visit=self._visit,
            splice=splice,
        )
        # The agent's run id: the controller closes the visits of a proxy that is gone
        # by it, and a worker is part of the agent's proxy.
        self.proxy.instance_id = instance_id
        self.proxy.claim_nonce_remote = self._claim_nonce
        self._nonces: dict[int, asyncio.Future[bool]] = {}
        self._next_id = 0
        self._have_state = False
        self._have_access = False
        self._ready = asyncio.Event()
        self._pushed: dict[str, list[list[Any]]] = {}
        self._pushed_stats: list[int] = []

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(message))

    # ------------------------------------------------------------ from the agent

    async def read_loop(self) -> None:
        while True:
            try:
                message = await read_message(self.reader)
            except ValueError as exc:
                log.warning("dropped a control message that is not JSON: %s", exc)
                continue
            if message is None:
                return
            try:
                if not isinstance(message, dict):
                    raise _BadMessage(f"expected an object, got {type(message).__name__}")
                self.handle(message)
            except (_BadMessage, ValueError, TypeError) as exc:
                log.warning("dropped a malformed control message: %s", exc)

    def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "state":
            self._state(message)
        elif kind == "access":
            self._access(message)
            self.send({"t": "ack", "id": _field(message, "id", int)})
        elif kind == "nonce":
            future = self._nonces.pop(_field(message, "id", int), None)
            if future is not None and not future.done():
                future.set_result(bool(_field(message, "ok", bool)))
        else:
            raise _BadMessage(f"unknown message type {kind!r}")
        if self._have_state and self._have_access:
            self._ready.set()

    def _state(self, message: dict[str, Any]) -> None:
        table = _field(message, "sessions", dict)
        sessions: dict[str, _Session] = {}
        for sid, entry in table.items():
            if not (isinstance(entry, list) and len(entry) == 3):
                raise _BadMessage(f"session {sid!r}: expected [status, port, secret]")
            status, port, secret = entry
            if not (isinstance(status, str) and isinstance(port, int) and isinstance(secret, str)):
                raise _BadMessage(f"session {sid!r}: expected [status, port, secret]")
            sessions[sid] = _Session(status, port, secret)
        key = message.get("key")
        if key is not None and not isinstance(key, str):
            raise _BadMessage("field 'key': expected base64 or null")
        cookie_max = message.get("cookieMax")
        if cookie_max is not None and not isinstance(cookie_max, int | float):
            raise _BadMessage("field 'cookieMax': expected a number or null")
        # Replaced in place: the proxy looks sessions up through this very dict.
        self.key = base64.b64decode(key, validate=True) if key is not None else None
        self.cookie_max = float(cookie_max) if cookie_max is not None else None
        self.sessions.clear()
        self.sessions.update(sessions)
        self._have_state = True
        self.proxy.end_stopped_sessions()

    def _access(self, message: dict[str, Any]) -> None:
        table = _field(message, "access", dict)
        lists: dict[str, list[int]] = {}
        for sid, users in table.items():
            if not (isinstance(users, list) and all(type(u) is int for u in users)):
                raise _BadMessage(f"access of session {sid!r}: expected a list of user ids")
            lists[sid] = users
        for sid, users in lists.items():
            self.proxy.set_access(sid, users)
        for sid in self.proxy.narrowed_sessions() - set(lists):
            self.proxy.forget_access(sid)
        self._have_access = True

    # ------------------------------------------------------------ to the agent

    async def _claim_nonce(self, nonce: str, expires_at: float) -> bool:
        self._next_id += 1
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._nonces[self._next_id] = future
        self.send({"t": "nonce", "id": self._next_id, "nonce": nonce, "expiresAt": expires_at})
        return await asyncio.wait_for(future, 10)

    def _visit(self, visit: pb.ConnectionVisit) -> None:
        self.send({"t": "visit", "pb": base64.b64encode(visit.SerializeToString()).decode()})

    def report(self) -> None:
        """Send who is connected where it changed since the last report, and the totals."""
        now: dict[str, list[list[Any]]] = {}
        for sid, users in self.proxy._activity.items():
            rows = sorted(
                [a.user_id, a.user_name, a.connections, int(a.last_activity), a.tunnels]
                for a in users.values()
            )
            if rows:
                now[sid] = rows
        for sid in set(now) | set(self._pushed):
            rows = now.get(sid, [])
            if self._pushed.get(sid, []) != rows:
                self.send({"t": "activity", "sid": sid, "users": rows})
        self._pushed = now
        s = self.proxy.stats
        stats = [
            s.connections,
            s.bytes_from_clients,
            s.bytes_to_clients,
            s.bytes_spliced,
            len(self.proxy._clients),
        ]
        if stats != self._pushed_stats:
            self.send({"t": "stats", "v": stats})
            self._pushed_stats = stats

    async def report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_SECONDS)
            self.report()

    async def run(self, host: str, port: int) -> int:
        reading = asyncio.create_task(self.read_loop())
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait({reading, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not self._ready.is_set():
            ready.cancel()
            log.error("the agent closed the control channel before the worker was ready")
            return 1
        try:
            await self.proxy.start(host, port, reuse_port=True, join=True)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
            return 1
        self.send({"t": "listening", "pid": os.getpid()})
        reporting = asyncio.create_task(self.report_loop())
        try:
            await reading
        except ControlError as exc:
            log.error("control channel broken: %s", exc)
        finally:
            reporting.cancel()
            # The visits it ends are reported while the channel may still be open (a
            # stop); at an agent's death they are closed by the controller instead.
            await self.proxy.close()
            self.report()
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()
            self.writer.close()
        return 0


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("PR_SET_PDEATHSIG failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent:
        # The agent died before the request above took effect.
        sys.exit(0)


async def _amain(args: argparse.Namespace) -> int:
    sock = socket.socket(fileno=args.control_fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    worker = Worker(reader, writer, instance_id=args.instance_id, splice=args.relay == "splice")
    return await worker.run(args.host, args.port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.proxy.worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--instance-id", required=True)
    parser.add_argument("--relay", choices=("copy", "splice"), default="copy")
    parser.add_argument("--name", default="worker")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(levelname)s proxy {args.name} (pid %(process)d): %(message)s",
    )
    _die_with_parent(args.parent_pid)
    # A worker exists to hold connections: its soft descriptor limit up to the hard one.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # A Ctrl-C in the agent's terminal reaches the whole process group: the agent
    # stops its workers itself, after it stopped taking connections.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return run(_amain(args))


if __name__ == "__main__":
    sys.exit(main())
