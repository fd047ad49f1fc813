"""The local admin socket: JSON over HTTP on `DIR/agent.sock` (mode 0600).

Endpoints (GET): `/v1/status`, `/v1/sessions`, `/v1/disk`, `/v1/doctor`. The CLI's
`status|sessions|disk|doctor` read them; the socket's file mode is the access check.
Actions (POST, a JSON object in and out): `/v1/drain` (`{"mode": "stop"|"wait"}`) and
`/v1/undrain`, for `studio-agent drain|undrain`. An action's ValueError is a 400 whose
body names it (`{"error": ...}`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

__all__ = ["AdminError", "AdminServer", "AgentNotRunning", "admin_get", "admin_post"]

Provider = Callable[[], Awaitable[dict[str, Any]]]
Action = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class AgentNotRunning(Exception):
    """Nothing answers on the admin socket."""


class AdminError(Exception):
    """The running agent refused an action; the message is its reason."""


class AdminServer:
    def __init__(
        self,
        socket_path: Path,
        providers: dict[str, Provider],
        actions: dict[str, Action] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.providers = providers
        self.actions = actions or {}
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        for name, provider in self.providers.items():
            app.router.add_get(f"/v1/{name}", self._endpoint(provider))
        for name, action in self.actions.items():
            app.router.add_post(f"/v1/{name}", self._action(action))
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

    @staticmethod
    def _action(action: Action) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            try:
                body = await request.json() if request.can_read_body else {}
            except ValueError:
                return web.json_response({"error": "the body is not JSON"}, status=400)
            if not isinstance(body, dict):
                return web.json_response({"error": "the body is not a JSON object"}, status=400)
            try:
                return web.json_response(await action(body))
            except ValueError as exc:
                return web.json_response({"error": str(exc)}, status=400)

        return handler


async def admin_post(
    socket_path: Path, name: str, body: dict[str, Any], limit_seconds: float = 10.0
) -> dict[str, Any]:
    """POST /v1/<name> to a running agent; AgentNotRunning, or AdminError when refused."""
    connector = aiohttp.UnixConnector(path=str(socket_path))
    try:
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=limit_seconds)
        ) as client:
            async with client.post(f"http://agent/v1/{name}", json=body) as resp:
                if resp.status >= 400:
                    # An agent older than the action answers 405 in plain text.
                    text = await resp.text()
                    with contextlib.suppress(ValueError, AttributeError):
                        text = str(json.loads(text).get("error") or text)
                    raise AdminError(f"the agent refused {name} (HTTP {resp.status}): {text}")
                data: dict[str, Any] = await resp.json()
                return data
    except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionRefusedError) as exc:
        raise AgentNotRunning(
            f"the agent is not running (nothing answers on {socket_path}: {exc})"
        ) from None


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
