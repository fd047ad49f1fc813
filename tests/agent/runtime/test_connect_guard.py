"""The connect guard (agent/runtime/connect_guard.py) in front of a tool that cannot check
the proxy's secret itself: real processes, the guard started as images start it
(`python -m ... --tool-port P -- TOOL ...{tool_port}...`) in front of a tiny aiohttp tool
that echoes what reaches it (its path, headers, its own environment) and a WebSocket.

Requests are written by hand where the test needs exact bytes (two copies of a header,
a bare LF), so that nothing in a client library tidies them up.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from agent.runtime.base import free_tcp_port
from agent.runtime.connect_guard import MAX_HEAD_BYTES, check_head, tool_argv
from agent.runtime.tool_guard import (
    MISSING_SECRET,
    NOT_FROM_PROXY,
    PROXY_SECRET_ENV,
    PROXY_SECRET_HEADER,
    USER_HEADER,
)
from tests import REPO_ROOT

SECRET = "s3cret-of-this-run"

# The tool: answers /echo with what reached it and echoes text on /ws; on SIGTERM it
# exits 7 (a status of its own, so that the guard is seen passing it on). It writes
# its pid to the file in argv[2] once listening.
ECHO_TOOL = r"""
import asyncio, json, os, signal, sys
from aiohttp import web

port, pidfile = int(sys.argv[1]), sys.argv[2]

async def echo(request):
    body = await request.read()
    return web.json_response({
        "path": request.path_qs,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body": body.decode(),
        "secret_in_env": os.environ.get("CONNECT_PROXY_SECRET"),
        "pid": os.getpid(),
    })

async def ws(request):
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    async for msg in sock:
        await sock.send_str("echo:" + msg.data)
    return sock

async def main():
    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/ws", ws)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    with open(pidfile, "w") as f:
        f.write(str(os.getpid()))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()
    sys.exit(7)

asyncio.run(main())
"""


@dataclass
class Running:
    guard: subprocess.Popen[bytes]
    port: int
    tool_port: int
    tool_pidfile: Path


def _start(
    tmp_path: Path, tool: list[str] | None = None, secret: str | None = SECRET
) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    script = tmp_path / "echo_tool.py"
    script.write_text(ECHO_TOOL)
    pidfile = tmp_path / "tool.pid"
    port, tool_port = free_tcp_port(), free_tcp_port()
    env = {k: v for k, v in os.environ.items() if k != PROXY_SECRET_ENV}
    env["CONNECT_TOOL_PORT"] = str(port)
    if secret is not None:
        env[PROXY_SECRET_ENV] = secret
    argv = tool or [sys.executable, str(script), "{tool_port}", str(pidfile)]
    module = "agent.runtime.connect_guard"
    guard = subprocess.Popen(
        [sys.executable, "-m", module, "--tool-port", str(tool_port), "--", *argv],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return guard, port, tool_port, pidfile


def _wait_listening(guard: subprocess.Popen[bytes], port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert guard.poll() is None, guard.communicate()
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("the guard never listened")


@pytest.fixture(name="running")
def running_fixture(tmp_path: Path) -> Iterator[Running]:
    guard, port, tool_port, pidfile = _start(tmp_path)
    try:
        _wait_listening(guard, port)
        yield Running(guard, port, tool_port, pidfile)
    finally:
        if guard.poll() is None:
            guard.send_signal(signal.SIGTERM)
            try:
                guard.wait(timeout=20)
            except subprocess.TimeoutExpired:
                guard.kill()
                guard.wait()
        if pidfile.exists():
            # Never leave the tool behind, whatever the guard did.
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _head(path: str = "/echo", headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: guard.test"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _exchange(port: int, data: bytes) -> tuple[int, str]:
    """One request with `Connection: close` semantics: the status and the whole body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=20)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


PROXY = [(PROXY_SECRET_HEADER, SECRET), (USER_HEADER, "alice")]


async def test_refuses_what_did_not_come_through_the_proxy(running: Running) -> None:
    cases = {
        "no secret": [(USER_HEADER, "alice")],
        "wrong secret": [(PROXY_SECRET_HEADER, "x" * len(SECRET)), (USER_HEADER, "alice")],
        "a prefix": [(PROXY_SECRET_HEADER, SECRET[:-1]), (USER_HEADER, "alice")],
        "two copies": [*PROXY, (PROXY_SECRET_HEADER, SECRET)],
        "two users": [*PROXY, (USER_HEADER, "bob")],
        "no user": [(PROXY_SECRET_HEADER, SECRET)],
        "blank user": [(PROXY_SECRET_HEADER, SECRET), (USER_HEADER, " ")],
    }
    for name, headers in cases.items():
        status, body = await _exchange(running.port, _head(headers=headers))
        assert status == 403 and NOT_FROM_PROXY in body, (name, status, body)


async def test_refuses_heads_that_are_not_strict(running: Running) -> None:
    right = _head(headers=PROXY)
    cases = {
        "bare LF": right.replace(b"\r\nHost", b"\nHost"),
        "obs-fold": right.replace(b"\r\nHost: guard.test", b"\r\nHost: guard.test\r\n folded"),
        "space before colon": right.replace(b"Host:", b"Host :"),
        "control character": right.replace(b"guard.test", b"guard\x01test"),
        "not HTTP/1": right.replace(b"HTTP/1.1", b"HTTP/2.0"),
    }
    for name, data in cases.items():
        status, body = await _exchange(running.port, data)
        assert status == 400, (name, status, body)
    # Larger than the guard holds: 431, never read on.
    big = _head(headers=[*PROXY, ("X-Big", "a" * MAX_HEAD_BYTES)])
    status, _ = await _exchange(running.port, big)
    assert status == 431


async def test_forwards_what_came_through_the_proxy(running: Running) -> None:
    body = b'{"x": 1}'
    head = (
        f"POST /echo?q=1 HTTP/1.1\r\nHost: guard.test\r\n{PROXY_SECRET_HEADER}: {SECRET}\r\n"
        f"{USER_HEADER}: alice\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    status, text = await _exchange(running.port, head + body)
    assert status == 200, text
    seen = json.loads(text)
    # The request reached the tool unchanged, body included; the tool's environment has
    # no secret (the guard took it out before starting it).
    assert seen["path"] == "/echo?q=1" and seen["body"] == '{"x": 1}'
    assert [USER_HEADER, "alice"] in seen["headers"]
    assert seen["secret_in_env"] is None
    assert seen["pid"] == int(running.tool_pidfile.read_text())
    with open(f"/proc/{seen['pid']}/environ", "rb") as f:
        assert SECRET.encode() not in f.read()
    assert SECRET not in " ".join(running.guard.args)  # type: ignore[arg-type]


async def test_keep_alive_and_websocket_are_spliced(running: Running) -> None:
    async with aiohttp.ClientSession() as http:
        # Several requests on one kept-alive connection: only the first head is checked,
        # the rest are spliced (the proxy adds the header to each of them anyway).
        for i in range(3):
            async with http.get(
                f"http://127.0.0.1:{running.port}/echo?n={i}", headers=PROXY
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["path"] == f"/echo?n={i}"
        ws = await http.ws_connect(f"http://127.0.0.1:{running.port}/ws", headers=PROXY)
        try:
            for word in ("hello", "world"):
                await ws.send_str(word)
                msg = await asyncio.wait_for(ws.receive(), timeout=10)
                assert msg.data == f"echo:{word}"
        finally:
            await ws.close()
        # A WebSocket without the secret never reaches the tool.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(
                f"http://127.0.0.1:{running.port}/ws", headers={USER_HEADER: "alice"}
            )
        assert refused.value.status == 403


def test_sigterm_ends_tool_and_guard_with_the_tools_status(running: Running) -> None:
    tool_pid = int(running.tool_pidfile.read_text())
    running.guard.send_signal(signal.SIGTERM)
    assert running.guard.wait(timeout=20) == 7
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{tool_pid}") and time.monotonic() < deadline:
        # The tool is the guard's child, reaped by it: its /proc entry goes with it.
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{tool_pid}")


def test_without_secret_starts_nothing(tmp_path: Path) -> None:
    guard, _, _, pidfile = _start(tmp_path, secret=None)
    _, err = guard.communicate(timeout=30)
    assert guard.returncode == 2 and MISSING_SECRET in err.decode()
    assert not pidfile.exists()


def test_tool_that_exits_before_listening_ends_the_guard(tmp_path: Path) -> None:
    guard, _, _, _ = _start(tmp_path, tool=[sys.executable, "-c", "import sys; sys.exit(5)"])
    guard.communicate(timeout=30)
    assert guard.returncode == 5


def test_check_head_and_placeholders() -> None:
    assert check_head(_head(headers=PROXY), SECRET) == ""
    # Header names are case-insensitive; values lose their surrounding white space.
    lower = [(PROXY_SECRET_HEADER.lower(), f" {SECRET}\t"), (USER_HEADER.upper(), "alice")]
    assert check_head(_head(headers=lower), SECRET) == ""
    assert check_head(_head(headers=PROXY), "") == NOT_FROM_PROXY
    assert tool_argv(["x", "--bind=127.0.0.1:{tool_port}", "{a}"], 81) == [
        "x",
        "--bind=127.0.0.1:81",
        "{a}",
    ]


def test_runs_as_images_carry_it_with_the_standard_library_only(tmp_path: Path) -> None:
    # As in an image: the two files as the package `studios_connect`, a Python without
    # site-packages (-S) or PYTHONPATH (-E): only the working directory.
    package = tmp_path / "studios_connect"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("tool_guard.py", "connect_guard.py"):
        (package / name).write_text((REPO_ROOT / "agent" / "runtime" / name).read_text())
    out = subprocess.run(
        [sys.executable, "-E", "-S", "-m", "studios_connect.connect_guard", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and "--tool-port" in out.stdout, out.stderr
