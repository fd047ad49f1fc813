"""Signed connect tokens: the seam between the controller's right-to-connect
check and the agent's proxy.

The controller signs a short-lived token for (session, user) with the key it
derived for the agent that runs the session (`derive_agent_key`) and sent to
that agent in `Welcome.connect_token_key`; the agent's proxy verifies it. An
agent holds only its own key, so it can neither verify nor mint tokens for
another agent's sessions.

Format: ``base64url(json payload) "." base64url(HMAC-SHA256(key, payload))``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

__all__ = [
    "ConnectClaims",
    "InvalidConnectToken",
    "derive_agent_key",
    "sign_connect_token",
    "verify_connect_token",
]


class InvalidConnectToken(Exception):
    """The token is malformed, tampered with, expired or for another session."""


@dataclass(frozen=True, slots=True)
class ConnectClaims:
    session_id: str
    user_id: int
    user_name: str
    expires_at: float
    nonce: str
    purpose: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def derive_agent_key(master_key: bytes, agent_id: str) -> bytes:
    return hmac.new(master_key, b"studios-connect:" + agent_id.encode(), hashlib.sha256).digest()


def sign_connect_token(
    key: bytes,
    *,
    session_id: str,
    user_id: int,
    user_name: str,
    ttl_seconds: float = 60.0,
    purpose: str = "connect",
    now: float | None = None,
) -> str:
    payload = {
        "sid": session_id,
        "uid": user_id,
        "un": user_name,
        "exp": (time.time() if now is None else now) + ttl_seconds,
        "n": secrets.token_urlsafe(12),
        "p": purpose,
    }
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    mac = hmac.new(key, body, hashlib.sha256).digest()
    return f"{_b64(body)}.{_b64(mac)}"


def verify_connect_token(
    key: bytes,
    token: str,
    *,
    session_id: str,
    purpose: str = "connect",
    now: float | None = None,
) -> ConnectClaims:
    """Return the claims of a valid token for `session_id`, or raise."""
    try:
        body_text, mac_text = token.split(".", 1)
        body, mac = _unb64(body_text), _unb64(mac_text)
    except ValueError as exc:
        raise InvalidConnectToken("malformed connect token") from exc
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        raise InvalidConnectToken("connect token signature does not match")
    try:
        payload = json.loads(body)
        claims = ConnectClaims(
            session_id=str(payload["sid"]),
            user_id=int(payload["uid"]),
            user_name=str(payload["un"]),
            expires_at=float(payload["exp"]),
            nonce=str(payload["n"]),
            purpose=str(payload["p"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidConnectToken("malformed connect token payload") from exc
    if claims.purpose != purpose:
        raise InvalidConnectToken(f"token is for {claims.purpose!r}, not {purpose!r}")
    if claims.session_id != session_id:
        raise InvalidConnectToken("connect token is for another session")
    if claims.expires_at < (time.time() if now is None else now):
        raise InvalidConnectToken("connect token has expired")
    return claims
