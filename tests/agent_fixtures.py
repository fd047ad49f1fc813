"""Fixtures shared by the agent tests: a fake controller, tool scripts, a real agent."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from aiohttp import web

from agent.daemon import Agent, AgentConfig
from agent.proxy import ConnectProxy
from agent.sessions.handle import load_handles
from agent.state import StateDir
from tests.fake_controller import FakeController

__all__ = [
    "agent_config_fixture",
    "agent_fixture",
    "controller_fixture",
    "kill_leftover_tools",
    "make_agent_config",
    "templates_file",
]

# A tool that waits before it listens, so "running only after it answers" is visible.
SLOW_TOOL = """
import http.server, os, sys, time
time.sleep(float(os.environ.get("SLOW_SECONDS", "1.0")))
port = int(os.environ["CONNECT_TOOL_PORT"])
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)
server.serve_forever()
"""

# Echoes request headers (every copy, in order, as [name, value] pairs: a dict would
# keep one copy of a repeated header, and tools see them all), bodies and WebSocket
# messages.
ECHO_TOOL = """
import os
from aiohttp import web

async def headers(request):
    return web.json_response(
        [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]
    )

async def echo(request):
    return web.Response(body=await request.read())

async def ws(request):
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    async for msg in sock:
        if msg.type == web.WSMsgType.TEXT:
            await sock.send_str("echo:" + msg.data)
        elif msg.type == web.WSMsgType.BINARY:
            await sock.send_bytes(msg.data[::-1])
    return sock

app = web.Application(client_max_size=64 * 1024 * 1024)
app.router.add_get("/headers", headers)
app.router.add_post("/echo", echo)
app.router.add_get("/ws", ws)
web.run_app(app, host="127.0.0.1", port=int(os.environ["CONNECT_TOOL_PORT"]), print=None)
"""


def templates_file(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    slow = directory / "slow_tool.py"
    slow.write_text(textwrap.dedent(SLOW_TOOL))
    echo = directory / "echo_tool.py"
    echo.write_text(textwrap.dedent(ECHO_TOOL))
    table = {
        "test/slow": {"command": ["{python}", str(slow)], "tool": "slow"},
        "test/echo": {"command": ["{python}", str(echo)], "tool": "echo"},
        "test/exit3": {
            "command": [
                "{python}",
                "-c",
                "import sys; print('boom: config missing', file=sys.stderr); sys.exit(3)",
            ],
            "tool": "exit",
        },
        "test/silent": {"command": ["{python}", "-c", "import time; time.sleep(120)"], "tool": "x"},
    }
    path = directory / "templates.json"
    path.write_text(json.dumps(table))
    return path


def make_agent_config(
    tmp_path: Path, controller: FakeController, **overrides: object
) -> AgentConfig:
    token_file = tmp_path / "agent-token"
    if not token_file.exists():
        token_file.write_text(controller.token + "\n")
    config = AgentConfig(
        controller=controller.address,
        token_file=token_file,
        compute_env="0123456789abcdef",
        state_dir=tmp_path / "state",
        proxy_port=0,
        local_templates=templates_file(tmp_path / "templates"),
        stop_grace_seconds=5.0,
        start_timeout_seconds=20.0,
        backoff_initial=0.1,
        backoff_max=0.5,
        disk_watch_seconds=0.5,
        # Plain directories unless a test asks for xfs-loop (which needs root).
        volume_kind="directory",
        # Tools as the agent's user: pytest's 0700 temporary directories (the state and
        # the tool scripts) are out of a per-session user's reach. The per-session users
        # are tested in tests/agent/runtime/test_local_unprivileged.py.
        local_tool_user="agent",
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def kill_leftover_tools(state_dir: Path) -> None:
    """Agents leave tools running on purpose; tests must not."""
    for handle in load_handles(StateDir(state_dir)):
        if not handle.pid:
            continue
        try:
            proc = psutil.Process(handle.pid)
            if abs(proc.create_time() - handle.create_time) > 0.05:
                continue
        except psutil.Error:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(handle.pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            proc.wait(5)


@pytest.fixture(name="controller")
async def controller_fixture() -> AsyncIterator[FakeController]:
    fc = FakeController()
    await fc.start()
    yield fc
    await fc.stop()


@pytest.fixture(name="agent_config")
def agent_config_fixture(tmp_path: Path, controller: FakeController) -> AgentConfig:
    return make_agent_config(tmp_path, controller)


@pytest.fixture(name="agent")
async def agent_fixture(
    agent_config: AgentConfig, controller: FakeController
) -> AsyncIterator[Agent]:
    a = Agent(agent_config)
    await a.start()
    await controller.wait_for(lambda: controller.messages("inventory"))
    try:
        yield a
    finally:
        await a.close()
        kill_leftover_tools(agent_config.state_dir)


@contextlib.asynccontextmanager
async def proxy_in_front_of(
    tool: web.Application, session_id: str, key: bytes
) -> AsyncIterator[tuple[ConnectProxy, int, SimpleNamespace]]:
    """A connect proxy on a free port whose one running session is `tool`:
    (proxy, proxy port, the session handle the proxy looks up)."""
    runner = web.AppRunner(tool, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        tool_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        handle = SimpleNamespace(
            status="running", port=tool_port, proxy_secret="", session_id=session_id
        )
        proxy = ConnectProxy(
            lookup=lambda sid: handle if sid == session_id else None, key=lambda: key
        )
        port = await proxy.start("127.0.0.1", 0)
        try:
            yield proxy, port, handle
        finally:
            await proxy.close()
    finally:
        await runner.cleanup()
