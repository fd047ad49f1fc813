"""Many idle WebSockets held open through the connect proxy: memory per connection, and
that descriptors, the connection table and memory come back after they close.

Three kinds of process, so that each holds only its own descriptors (a WebSocket through
a proxy is one socket in the client, two in the proxy and one in the tool):

- `upstream`: a minimal WebSocket tool (answers the upgrade with 101, then one small
  frame for every frame it gets);
- `proxy`: the agent's `ConnectProxy` on its own, in front of that tool; it answers
  `stats` on stdin with its connection table, descriptors and RSS;
- `clients`: opens N WebSockets (raw asyncio, 256 handshakes in flight), checks a sample
  answers (`ping`) and closes them all (`close`) when told on stdin.

The anchor is nginx (Debian's nginx-light, one worker process, `master_process off`) in
front of the same tool, measured the same way; skipped, and said so, without nginx.

A proxy process needs two descriptors per WebSocket, so N is capped by its hard
`RLIMIT_NOFILE` (20,000 here: at most 9,968 WebSockets with the few descriptors every
process has); the soft limit is raised to the hard one, and the hard one too where
allowed (root with CAP_SYS_RESOURCE, up to /proc/sys/fs/nr_open). `--workers P` runs the
proxy as the agent does with `--proxy-workers P` (P processes sharing the port,
`ProxyWorkers`): the cap is then P times that, less a margin for the kernel's uneven
spread, and descriptors and RSS are reported per process. The clients are spread over
`--client-processes` processes (by default one per 5,000 WebSockets).

    python -m tests.bench.bench_proxy_idle_ws [--connections 10000] [--rounds 2] [--workers 2]

prints JSON: per target, RSS and descriptors at baseline, with N open, and after they
closed (per round: a second round that does not grow RSS shows nothing leaks).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import gc
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

SID = "be0c0001"
KEY = b"b" * 32
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_PING = b"\x81\x84abcd" + bytes(c ^ m for c, m in zip(b"ping", b"abcdabcd", strict=False))
_PONG = b"\x81\x04pong"


def raise_fd_limit(wanted: int) -> int:
    """Soft limit up to the hard one (and the hard one up to `wanted` where allowed)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def max_websockets(limit: int, reserve: int = 32) -> int:
    """WebSockets one proxy process can hold: two descriptors each."""
    return (limit - reserve) // 2


# ---------------------------------------------------------------- the tool


class _WsTool(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.open:
            self.transport.write(_PONG)  # one answer per chunk is enough for idle sockets
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        key = b""
        for line in self.head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.open, self.head = True, b""


async def start_tool(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(_WsTool, host, port, backlog=4096)


async def _run_upstream() -> None:
    raise_fd_limit(1 << 16)
    server = await start_tool()
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    await _wait_stdin_closed()


# ---------------------------------------------------------------- clients


def _upgrade(host: str, cookie: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        + (f"Cookie: studios-connect={cookie}\r\n" if cookie else "")
        + "\r\n"
    ).encode()


async def open_websockets(
    port: int, n: int, cookie: str, in_flight: int = 256
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """N WebSockets through 127.0.0.1:port to session SID (raw handshakes)."""
    gate = asyncio.Semaphore(in_flight)
    request = _upgrade(f"{SID}.localhost:{port}", cookie)

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=4096)
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            if not head.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"upgrade refused: {head[:200]!r}")
            return reader, writer

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def ping_sample(
    socks: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], sample: int = 100
) -> int:
    """Frames answered by the tool on `sample` sockets spread over all of them."""
    step = max(1, len(socks) // sample)
    chosen = socks[::step][:sample]
    for _r, w in chosen:
        w.write(_PING)
    answers = await asyncio.gather(
        *(asyncio.wait_for(r.readexactly(len(_PONG)), 10) for r, _w in chosen)
    )
    return sum(1 for a in answers if a == _PONG)


async def close_websockets(socks: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _r, w in socks:
        w.close()
    await asyncio.gather(*(w.wait_closed() for _r, w in socks), return_exceptions=True)


async def _run_clients(port: int, n: int, cookie: str) -> None:
    raise_fd_limit(1 << 16)
    started = time.monotonic()
    socks = await open_websockets(port, n, cookie)
    print(f"OPEN {len(socks)} {time.monotonic() - started:.3f}", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line == "ping":
            print(f"PONG {await ping_sample(socks)}", flush=True)
        elif line in ("close", ""):
            started = time.monotonic()
            await close_websockets(socks)
            print(f"CLOSED {time.monotonic() - started:.3f}", flush=True)
            return


# ---------------------------------------------------------------- the proxy on its own


def malloc_trim() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise, so RSS stays high)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def proxy_stats(proxy: Any, trim: bool = False) -> dict[str, Any]:
    gc.collect()
    if trim:
        malloc_trim()
    return {
        "rssKib": rss_kib(),
        "fds": fd_count(),
        # Python objects alive: back to the baseline once everything closed.
        "allocatedBlocks": sys.getallocatedblocks(),
        "clients": len(proxy._clients),
        "sessionsWithActivity": len(proxy._activity),
        "connections": sum(a.connections for u in proxy._activity.values() for a in u.values()),
    }


def processes_stats(proxy: Any, pids: list[int], trim: bool = False) -> dict[str, Any]:
    """The proxy's own stats plus, per process (the proxy's first, then its workers'),
    descriptors and RSS; rssKib and fds are the sums over all of them."""
    own = proxy_stats(proxy, trim)
    processes = [{"pid": os.getpid(), "rssKib": own["rssKib"], "fds": own["fds"]}]
    for pid in pids:
        with contextlib.suppress(OSError):
            processes.append({"pid": pid, "rssKib": rss_kib(pid), "fds": fd_count(pid)})
    own["processes"] = processes
    own["rssKib"] = sum(p["rssKib"] for p in processes)
    own["fds"] = sum(p["fds"] for p in processes)
    # Counted by the proxy over every process (what the agent reports).
    own["clients"] = proxy.open_connections
    own["connections"] = sum(a.connections for a in proxy.active_users(SID))
    return own


async def _run_proxy(tool_port: int, processes: int = 1) -> None:
    from agent.proxy import ConnectProxy
    from agent.proxy.workers import ProxyWorkers

    raise_fd_limit(1 << 16)
    handle = SimpleNamespace(status="running", port=tool_port, proxy_secret="", session_id=SID)
    proxy = ConnectProxy(lookup=lambda sid: handle if sid == SID else None, key=lambda: KEY)
    port = await proxy.start("127.0.0.1", 0, reuse_port=processes > 1)
    workers: ProxyWorkers | None = None
    if processes > 1:
        workers = ProxyWorkers(
            proxy,
            count=processes - 1,
            host="127.0.0.1",
            port=port,
            sessions=lambda: [(SID, handle)],
        )
        await workers.start()
    pids = workers.pids() if workers is not None else []
    print(f"READY {port} {','.join(str(p) for p in [os.getpid(), *pids])}", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if not line:
            break
        if line == "settle":
            # The workers report their connections every REPORT_SECONDS.
            await asyncio.sleep(1.0)
            line = "stats"
        stats = processes_stats(proxy, pids, trim=line == "trim")
        print(json.dumps(stats), flush=True)
    if workers is not None:
        await workers.close()
    await proxy.close()


async def _wait_stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline):
        pass


def cookie_for(user_id: int = 1) -> str:
    from studios_shared.connect_token import sign_connect_token

    return sign_connect_token(
        KEY, session_id=SID, user_id=user_id, user_name="bench", ttl_seconds=3600, purpose="cookie"
    )


# ---------------------------------------------------------------- the driver


class Child:
    """A helper process of this module, talked to by lines on stdin/stdout."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.bench_proxy_idle_ws", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def line(self, send: str | None = None, timeout: float = 300) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if send is not None:
            self.proc.stdin.write(send + "\n")
            self.proc.stdin.flush()
        out = self.proc.stdout.readline().strip()
        if not out:
            raise RuntimeError(f"helper {self.proc.args!r} ended (exit {self.proc.poll()})")
        return out

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _wait_fds(pids: list[int], wanted: int, timeout: float = 20) -> float:
    started = time.monotonic()
    while sum(fd_count(pid) for pid in pids) > wanted and time.monotonic() - started < timeout:
        time.sleep(0.05)
    return time.monotonic() - started


def start_nginx(tmp: Path, tool_port: int, connections: int) -> tuple[subprocess.Popen[bytes], int]:
    nginx = shutil.which("nginx")
    assert nginx is not None
    from tests.e2e_harness import free_port

    port = free_port()
    conf = tmp / "nginx.conf"
    # nginx counts both sides of every tunnel and starts reusing (dropping) idle
    # connections once fewer than 1/16 of worker_connections are free.
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    worker_connections = 2 * connections * 17 // 16 + 1024
    conf.write_text(
        f"""
worker_processes 1;
master_process off;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
worker_rlimit_nofile {fd_limit};
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    client_body_temp_path {tmp};
    proxy_temp_path {tmp};
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://127.0.0.1:{tool_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
"""
    )
    proc = subprocess.Popen(
        [nginx, "-c", str(conf), "-p", str(tmp)],
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            import socket

            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("nginx did not start")


def measure(
    name: str,
    port: int,
    pids: list[int],
    n: int,
    rounds: int,
    stats: Any,
    stats_trimmed: Any,
    client_processes: int = 1,
    held_stats: Any = None,
) -> dict[str, Any]:
    """`rounds` times: open N, sample pings, close; stats() -> dict with rssKib and fds
    (`stats_trimmed`: the same after glibc returned freed heap to the OS, where it can;
    `held_stats`: stats() once the proxy's counts settled, if it differs)."""
    baseline = stats()
    out: dict[str, Any] = {
        "target": name,
        "connections": n,
        "clientProcesses": client_processes,
        "baseline": baseline,
        "rounds": [],
    }
    shares = [n // client_processes + (i < n % client_processes) for i in range(client_processes)]
    for _ in range(rounds):
        clients = [Child("clients", str(port), str(share), cookie_for()) for share in shares]
        try:
            count, open_seconds = 0, 0.0
            for child in clients:
                _, opened, seconds = child.line().split()
                count += int(opened)
                open_seconds = max(open_seconds, float(seconds))
            held = (held_stats or stats)()
            answered = sum(int(child.line("ping").split()[1]) for child in clients)
            closing = max(float(child.line("close").split()[1]) for child in clients)
        finally:
            for child in clients:
                child.stop()
        settle = _wait_fds(pids, baseline["fds"])
        time.sleep(1.5)  # the proxy's once-a-second sweep notices users who left
        after = stats()
        trimmed = stats_trimmed()
        grown = held["rssKib"] - baseline["rssKib"]
        out["rounds"].append(
            {
                "opened": int(count),
                "openSeconds": float(open_seconds),
                "pingAnswered": f"{answered}/{100 * len(clients)}",
                "held": held,
                "rssPerConnectionKib": round(grown / int(count), 2),
                "closeSeconds": closing,
                "fdsBackSeconds": round(settle, 3),
                "after": after,
                "fdsBackToBaseline": after["fds"] <= baseline["fds"],
                "rssAfterMinusBaselineKib": after["rssKib"] - baseline["rssKib"],
                "afterMallocTrim": trimmed,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role")
    sub.add_parser("upstream")
    p = sub.add_parser("proxy")
    p.add_argument("tool_port", type=int)
    p.add_argument("processes", type=int, nargs="?", default=1)
    c = sub.add_parser("clients")
    c.add_argument("port", type=int)
    c.add_argument("n", type=int)
    c.add_argument("cookie")
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--workers", type=int, default=1, help="proxy processes sharing the port (default 1)"
    )
    parser.add_argument(
        "--client-processes", type=int, default=0, help="default: one per 5,000 WebSockets"
    )
    parser.add_argument("--skip-nginx", action="store_true")
    args = parser.parse_args()
    if args.role == "upstream":
        asyncio.run(_run_upstream())
        return
    if args.role == "proxy":
        from agent.proxy.loop import run as run_on_agent_loop

        # The agent's loop (uvloop where installed), as the agent runs its proxy.
        run_on_agent_loop(_run_proxy(args.tool_port, args.processes))
        return
    if args.role == "clients":
        asyncio.run(_run_clients(args.port, args.n, args.cookie))
        return

    limit = raise_fd_limit(2 * args.connections + 64)
    per_process = max_websockets(limit)
    # SO_REUSEPORT spreads by a hash, not evenly: 10% left for the busiest process.
    cap = per_process if args.workers == 1 else int(per_process * args.workers * 0.9)
    n = min(args.connections, cap)
    client_processes = args.client_processes or max(1, -(-n // 5000))
    results: dict[str, Any] = {
        "benchmark": "idle WebSockets through the connect proxy",
        "requested": args.connections,
        "connections": n,
        "fdHardLimit": limit,
        "note": (
            ""
            if n == args.connections
            else f"capped at {n}: a proxy process needs 2 descriptors per WebSocket and the "
            f"hard RLIMIT_NOFILE is {limit} (raising it was refused); --workers "
            f"{args.workers} process(es)"
        ),
        "proxyProcesses": args.workers,
        "cpus": os.cpu_count(),
        "targets": [],
        "skipped": [],
    }
    upstream = Child("upstream")
    try:
        tool_port = int(upstream.line().split()[1])
        proxy = Child("proxy", str(tool_port), str(args.workers))
        try:
            _ready, port_text, pid_list = proxy.line().split()
            port = int(port_text)
            results["targets"].append(
                measure(
                    "studios-proxy" if args.workers == 1 else f"studios-proxy-{args.workers}proc",
                    port,
                    [int(p) for p in pid_list.split(",")],
                    n,
                    args.rounds,
                    lambda: json.loads(proxy.line("stats")),
                    lambda: json.loads(proxy.line("trim")),
                    client_processes,
                    lambda: json.loads(proxy.line("settle")),
                )
            )
        finally:
            proxy.stop()
        if args.skip_nginx:
            results["skipped"].append("nginx: --skip-nginx")
        elif shutil.which("nginx") is None:
            results["skipped"].append("nginx: not installed")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                ngx, ngx_port = start_nginx(Path(tmp), tool_port, n)
                try:
                    results["targets"].append(
                        measure(
                            "nginx",
                            ngx_port,
                            [ngx.pid],
                            n,
                            args.rounds,
                            lambda: {"rssKib": rss_kib(ngx.pid), "fds": fd_count(ngx.pid)},
                            lambda: None,
                        )
                    )
                finally:
                    ngx.terminate()
                    ngx.wait(10)
    finally:
        upstream.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
