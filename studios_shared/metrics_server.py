"""The `/metrics` listener of a daemon: Prometheus' text format on an address of its own.

Each daemon serves its metrics on a separate listener (`--metrics HOST:PORT`, a bare
PORT binds 127.0.0.1), never on its public port: the figures (how many studios, who
is connected, request rates) are for the operator, and a listener of its own can be
bound to the loopback address or a management network and firewalled apart from the
API. Only `GET /metrics` (and HEAD) is answered; anything else is 404.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["DEFAULT_METRICS_HOST", "MetricsServer", "parse_metrics_address"]

log = logging.getLogger(__name__)

DEFAULT_METRICS_HOST = "127.0.0.1"


def parse_metrics_address(text: str, *, what: str = "--metrics") -> tuple[str, int]:
    """``PORT`` (on 127.0.0.1), ``HOST:PORT`` or ``[IPv6]:PORT``; ValueError naming `what`."""
    value = text.strip()
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = DEFAULT_METRICS_HOST, value
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"{what}: expected PORT or HOST:PORT, got {text!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{what}: port must be an integer from 0 to 65535, got {port_text!r}")
    return host, int(port_text)


class MetricsServer:
    """An aiohttp listener whose one page is the exposition `scrape` renders."""

    def __init__(self, scrape: Callable[[], Awaitable[bytes]]) -> None:
        self._scrape = scrape
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            body = await self._scrape()
        except Exception as exc:
            log.exception("rendering /metrics failed")
            return web.Response(
                status=500, text=f"metrics unavailable: {type(exc).__name__}: {exc}\n"
            )
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self, host: str, port: int) -> int:
        """Listen on (host, port); the bound port (port 0: a free one)."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"cannot listen for /metrics on {host}:{port}: {exc.strerror}") from exc
        self._runner = runner
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                self.port = int(address[1])
                break
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
