"""The local admin socket: JSON over HTTP on `DIR/agent.sock` (mode 0600).

Endpoints (GET): `/v1/status`, `/v1/sessions`, `/v1/disk`, `/v1/doctor`. The CLI's
`status|sessions|disk|doctor` read them; the socket's file mode is the access check.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

__all__ = ["AdminServer", "AgentNotRunning", "admin_get"]

Provider = Callable[[], Awaitable[dict[str, Any]]]


class AgentNotRunning(Exception):
    """Nothing answers on the admin socket."""


class AdminServer:
    def __init__(self, socket_path: Path, providers: dict[str, Provider]) -> None:
        self.socket_path = socket_path
        self.providers = providers
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        for name, provider in self.providers.items():
            app.router.add_get(f"/v1/{name}", self._endpoint(provider))
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        # The agent holds the state-dir lock, so a socket file left here is stale.
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bind with a tight umask so the socket is never reachable by others, even briefly.
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(self.socket_path))
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)
        await web.SockSite(self._runner, sock).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    @staticmethod
    def _endpoint(provider: Provider) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            return web.json_response(await provider())

        return handler


async def admin_get(socket_path: Path, name: str, limit_seconds: float = 10.0) -> dict[str, Any]:
    """GET /v1/<name> from a running agent; raises AgentNotRunning."""
    connector = aiohttp.UnixConnector(path=str(socket_path))
    try:
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=limit_seconds)
        ) as client:
            async with client.get(f"http://agent/v1/{name}") as resp:
                resp.raise_for_status()
                data: dict[str, Any] = await resp.json()
                return data
    except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionRefusedError) as exc:
        raise AgentNotRunning(
            f"the agent is not running (nothing answers on {socket_path}: {exc})"
        ) from None
