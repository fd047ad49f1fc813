"""JupyterLab as a session tool behind the connect proxy (the `studios/jupyterlab` template).

`python -m agent.runtime.jupyter_tool --port P --root-dir DIR [jupyter args...]` runs JupyterLab on
127.0.0.1:P with the settings it needs behind the proxy:

- Jupyter's own login is off (`IdentityProvider.token=''`, no password): the proxy has
  already authenticated every request. Instead `StudiosIdentityProvider` believes only
  the proxy: every request must carry the session's proxy secret (`X-Studios-Proxy-Secret`,
  equal to the `$CONNECT_PROXY_SECRET` the agent started the tool with, compared in
  constant time) and then takes the user from `X-Studios-User`, the header the proxy sets
  on every request (and removes from what clients send), so JupyterLab shows who is who.
  Anything else (a user of the host or another session reaching the port directly, with
  or without a forged `X-Studios-User`) is answered 403 before any of Jupyter's handlers
  runs: no page, no API, no kernel, no terminal, no static file (only bare redirects, `/`
  to `/lab` or a trailing slash, and 405 to a method a route lacks answer without it,
  serving nothing). Listening on the loopback only is not enough on a host with other
  users.
- Without `$CONNECT_PROXY_SECRET` the tool refuses to start (the safe default: a tool
  that cannot tell the proxy from anyone else must not answer at all). The secret is
  taken out of the environment before Jupyter starts, so kernels and terminals (the
  user's code) do not inherit it.
- `allow_remote_access`: Jupyter otherwise refuses a `Host` that is not `localhost` or an
  IP, and the proxy forwards the browser's `<sessionId>.<proxy domain>` unchanged (which
  also keeps Jupyter's same-origin checks of WebSockets meaningful).
- The XSRF check stays on: JupyterLab's front end sends the `_xsrf` cookie back as
  `X-XSRFToken` by itself, and API clients can do the same (a page load sets the cookie).

Without the `jupyterlab` package the tool exits at once naming it; the agent puts that
line into the session's error message.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import Any

# Relative: studio images carry this file and tool_guard.py as a package of their own
# (`studios_connect`, images/README.md), without the rest of the agent.
from .tool_guard import (
    MISSING_SECRET,
    PROXY_SECRET_HEADER,
    USER_HEADER,
    proxy_refusal,
    take_proxy_secret,
)

__all__ = ["jupyter_argv", "main"]

# This module's importable name (`agent.runtime.jupyter_tool` here, `studios_connect.
# jupyter_tool` in an image): Jupyter imports the identity provider by it, and under
# `python -m` `__name__` is `__main__`.
_MODULE = __spec__.name if __spec__ is not None else __name__

# The proxy's secret, set by `main`: in a module global, never on Jupyter's command line
# (which every user of the host can read in /proc).
_proxy_secret = ""

MISSING = (
    "the JupyterLab template needs the Python package 'jupyterlab' in {python}: "
    "install it with `{python} -m pip install jupyterlab` (or `pip install studios[jupyter]`)"
)


def jupyter_argv(port: int, root_dir: str, ip: str = "127.0.0.1") -> list[str]:
    return [
        "--no-browser",
        # The loopback for local tools; a container's tool listens on its own network
        # namespace's addresses (0.0.0.0), where only the published port reaches it.
        f"--ip={ip}",
        f"--port={port}",
        # Another free port is never taken instead: the agent probes exactly this one.
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root_dir}",
        "--ServerApp.allow_remote_access=True",
        # Jupyter refuses root without it. Tools run as root only where the operator
        # chose it (`--local-tool-user agent` of an agent running as root); otherwise as
        # a per-session user or the agent's unprivileged one, where it changes nothing.
        "--allow-root",
        "--IdentityProvider.token=",
        "--ServerApp.password=",
        f"--ServerApp.identity_provider_class={_MODULE}.StudiosIdentityProvider",
        # No "open this URL with a token" banner and no update checks from a session.
        "--LabApp.news_url=",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]


def _identity_provider() -> type[Any]:
    from jupyter_server.auth.identity import IdentityProvider, User
    from jupyter_server.base.handlers import APIHandler
    from tornado.web import Finish
    from traitlets import List

    class StudiosIdentityProvider(IdentityProvider):
        """The user the proxy vouches for; nobody without the proxy's secret."""

        # Users are made afresh from the header on every request: nothing to update.
        updatable_fields: List[str] = List(default_value=[])

        def get_user(self, handler: Any) -> User | None:
            headers = handler.request.headers
            refusal = proxy_refusal(
                _proxy_secret,
                headers.get_list(PROXY_SECRET_HEADER),
                headers.get_list(USER_HEADER),
            )
            if refusal:
                # Jupyter calls this in every handler's `prepare`, before the handler
                # runs: `Finish` ends the request right here, with this answer,
                # whatever the handler (pages, API, WebSockets, terminals).
                handler.clear()
                handler.set_status(403)
                if isinstance(handler, APIHandler):
                    # Jupyter's own shape of an API error (its `finish` makes it JSON).
                    raise Finish(json.dumps({"message": refusal, "reason": "Forbidden"}))
                handler.set_header("Content-Type", "text/plain; charset=utf-8")
                raise Finish(refusal + "\n")
            name = headers.get(USER_HEADER, "").strip()
            return User(username=name, name=name, display_name=name)

    return StudiosIdentityProvider


def __getattr__(name: str) -> Any:
    # Jupyter imports the class by name; jupyter_server is only imported in the tool.
    if name == "StudiosIdentityProvider":
        cls = _identity_provider()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {_MODULE}")
    # An image's command cannot expand variables (no shell): the port defaults to the
    # one the agent gives every tool.
    port = os.environ.get("CONNECT_TOOL_PORT", "")
    parser.add_argument("--port", type=int, required=not port, default=port or None)
    parser.add_argument("--root-dir", required=True)
    parser.add_argument("--ip", default="127.0.0.1")
    args, extra = parser.parse_known_args(argv)
    if importlib.util.find_spec("jupyterlab") is None:
        print(MISSING.format(python=sys.executable), file=sys.stderr, flush=True)
        return 2
    # Out of the environment before Jupyter starts anything: kernels and terminals
    # copy os.environ.
    secret = take_proxy_secret()
    if not secret:
        print(MISSING_SECRET, file=sys.stderr, flush=True)
        return 2
    from jupyterlab.labapp import LabApp

    # Jupyter imports the identity provider by its name (`_MODULE`): under `python -m`
    # that is another module object than this one (`__main__`).
    setattr(importlib.import_module(_MODULE), "_proxy_secret", secret)  # noqa: B010
    LabApp.launch_instance(argv=[*jupyter_argv(args.port, args.root_dir, args.ip), *extra])
    return 0


if __name__ == "__main__":
    sys.exit(main())
