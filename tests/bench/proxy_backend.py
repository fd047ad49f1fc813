"""A tiny aiohttp backend for the proxy benchmark: `/1k` and `/1m` answer fixed bodies.

Runs as a Studios tool (listens on `$CONNECT_TOOL_PORT` or the port given as argument).
"""

from __future__ import annotations

import os
import sys

from aiohttp import web

BODIES = {"/1k": b"x" * 1024, "/1m": b"y" * (1024 * 1024)}


async def handle(request: web.Request) -> web.Response:
    body = BODIES.get(request.path)
    if body is None:
        return web.Response(text="proxy benchmark backend\n")
    return web.Response(body=body, content_type="application/octet-stream")


def main() -> None:
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ["CONNECT_TOOL_PORT"])
    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
