"""How a shipped template believes only the agent's connect proxy.

The agent makes a fresh secret for every run of a session, keeps it in the session's
handle, starts the tool with it in `$CONNECT_PROXY_SECRET`, and its proxy adds it to
every request it forwards as `X-Studios-Proxy-Secret` (dropping any copy a client
sent). A tool refuses every request without exactly that secret: whoever reaches the
tool's port without the proxy (another user of the host, another session) does not
know it, so cannot pose as a user with `X-Studios-User`.

This module is imported by the tools themselves (`jupyter_tool`, `http_tool`), so it
depends on the standard library only.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import MutableMapping, Sequence

__all__ = [
    "MISSING_SECRET",
    "NOT_FROM_PROXY",
    "PROXY_SECRET_ENV",
    "PROXY_SECRET_HEADER",
    "USER_HEADER",
    "proxy_refusal",
    "take_proxy_secret",
]

# A CONNECT_* name: a studio's `configuration.environment` can never set it
# (studios_shared/environment.py refuses the prefix).
PROXY_SECRET_ENV = "CONNECT_PROXY_SECRET"
# The same names as agent/proxy/server.py's (which cannot be imported from this layer;
# tests/agent/runtime/test_tool_secret.py checks that they agree).
PROXY_SECRET_HEADER = "X-Studios-Proxy-Secret"
USER_HEADER = "X-Studios-User"

NOT_FROM_PROXY = (
    "refused: this tool answers only requests that come through the Studios connect "
    "proxy (open the studio's URL instead of the tool's port)"
)
MISSING_SECRET = (
    f"${PROXY_SECRET_ENV} is not set: the tool refuses to start without the secret of the "
    "connect proxy (it is started by the Studios agent, which sets it)"
)


def take_proxy_secret(environ: MutableMapping[str, str] | None = None) -> str:
    """The proxy's secret from the environment ("" when there is none), removed from it:
    the tool's children (kernels, terminals, the user's code) have no use for it."""
    env = os.environ if environ is None else environ
    return env.pop(PROXY_SECRET_ENV, "")


def proxy_refusal(secret: str, secrets_sent: Sequence[str], users_sent: Sequence[str]) -> str:
    """Why a request is not believed ("" when it came through the proxy): it must carry
    exactly one copy of the secret header, equal to `secret`, and one user."""
    # An empty expected secret would match an empty header: a tool without a secret
    # believes nobody rather than everybody.
    if not secret or len(secrets_sent) != 1 or len(users_sent) != 1:
        return NOT_FROM_PROXY
    # Constant time: how much of a guess matched must not show in the answer's timing.
    sent = secrets_sent[0].encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(sent, secret.encode("utf-8", "surrogateescape")):
        return NOT_FROM_PROXY
    if not users_sent[0].strip():
        return NOT_FROM_PROXY
    return ""
