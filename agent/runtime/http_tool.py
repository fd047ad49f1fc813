"""The session's root as web pages (the `studios/python-http` template).

`python -m agent.runtime.http_tool --port P --root-dir DIR` serves DIR on 127.0.0.1:P with
Python's `http.server` (files and directory listings, GET and HEAD), believing only the
connect proxy: every request must carry the session's proxy secret (`X-Studios-Proxy-Secret`,
equal to the `$CONNECT_PROXY_SECRET` the agent started it with; agent/runtime/tool_guard.py)
and a user (`X-Studios-User`), else it is answered 403 and nothing is served. Directory
listings say who the proxy vouched for.

Without `$CONNECT_PROXY_SECRET` the tool refuses to start: one that cannot tell the proxy
from any other user of the host must not serve the session's files at all.
"""

from __future__ import annotations

import argparse
import functools
import html
import io
import os
import sys
import urllib.parse
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent.runtime.tool_guard import (
    MISSING_SECRET,
    PROXY_SECRET_HEADER,
    USER_HEADER,
    proxy_refusal,
    take_proxy_secret,
)

__all__ = ["ToolServer", "main"]


class ToolServer(ThreadingHTTPServer):
    """An HTTP server that knows the proxy's secret."""

    # Requests in flight do not keep the tool alive when it is told to stop.
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, proxy_secret: str) -> None:
        self.proxy_secret = proxy_secret
        super().__init__(address, handler)


class _Handler(SimpleHTTPRequestHandler):
    server: ToolServer
    server_version = "studios-http/1"
    user = ""

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        refusal = proxy_refusal(
            self.server.proxy_secret,
            self.headers.get_all(PROXY_SECRET_HEADER) or [],
            self.headers.get_all(USER_HEADER) or [],
        )
        if refusal:
            self._refuse(refusal)
            return False
        self.user = str(self.headers.get(USER_HEADER, "")).strip()
        return True

    def _refuse(self, refusal: str) -> None:
        body = (refusal + "\n").encode()
        self.send_response(HTTPStatus.FORBIDDEN)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        # Whatever body the request has is not read: the connection cannot go on.
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def list_directory(self, path: str | os.PathLike[str]) -> io.BytesIO | None:
        try:
            names = sorted(os.listdir(path), key=str.lower)
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND, "No permission to list directory")
            return None
        shown = urllib.parse.unquote(
            self.path.split("?", 1)[0].split("#", 1)[0], errors="surrogatepass"
        )
        title = html.escape(f"Directory listing for {shown}", quote=False)
        items = []
        for name in names:
            full = os.path.join(path, name)
            label = link = name
            if os.path.isdir(full):
                label = link = name + "/"
            elif os.path.islink(full):
                label = name + "@"
            href = html.escape(urllib.parse.quote(link, errors="surrogatepass"))
            items.append(f'<li><a href="{href}">{html.escape(label, quote=False)}</a></li>')
        page = "\n".join(
            [
                "<!DOCTYPE HTML>",
                '<html lang="en">',
                '<head><meta charset="utf-8">',
                f"<title>{title}</title>",
                "</head>",
                "<body>",
                f"<h1>{title}</h1>",
                f"<p>Signed in as <b>{html.escape(self.user)}</b>.</p>",
                "<hr>",
                "<ul>",
                *items,
                "</ul>",
                "<hr>",
                "</body>",
                "</html>",
                "",
            ]
        )
        encoded = page.encode("utf-8", "surrogateescape")
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(encoded)))
        self.end_headers()
        return io.BytesIO(encoded)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.runtime.http_tool")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root-dir", required=True)
    args = parser.parse_args(argv)
    secret = take_proxy_secret()
    if not secret:
        print(MISSING_SECRET, file=sys.stderr, flush=True)
        return 2
    handler = functools.partial(_Handler, directory=args.root_dir)
    # The loopback only: the proxy dials 127.0.0.1; the secret is what keeps the host's
    # other users out.
    with ToolServer(("127.0.0.1", args.port), handler, secret) as server:
        print(f"serving {args.root_dir}", file=sys.stderr, flush=True)
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
