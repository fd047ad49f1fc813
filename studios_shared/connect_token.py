"""Signed connect tokens: the seam between the controller's right-to-connect
check and the agent's proxy.

The controller signs a short-lived token for (session, user) with the key it
derived for the agent that runs the session (`derive_agent_key`) and sent to
that agent in `Welcome.connect_token_key`; the agent's proxy verifies it. An
agent holds only its own key, so it can neither verify nor mint tokens for
another agent's sessions.

The agent's proxy trades a connect token for a cookie of its own, signed the
same way (purpose ``cookie``). Whoever holds an agent's key can sign either, so
the verifier bounds them itself (`max_lifetime`): a token or cookie that expires
further than that from its issue time, or from now, is refused whatever the
signer wrote. The proxy's cookie bound is the controller's browser session
cookie lifetime (`Welcome.connect_cookie_max_seconds`, else
`DEFAULT_COOKIE_MAX_SECONDS`); connect tokens are bound by
`CONNECT_TOKEN_MAX_SECONDS`.

Format: ``base64url(json payload) "." base64url(HMAC-SHA256(key, payload))``;
the payload is ``{sid, uid, un, iat, exp, n, p}`` (``iat``: issued at, absent
from tokens of signers older than the bound).
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
    "CLOCK_SKEW_SECONDS",
    "CONNECT_TOKEN_MAX_SECONDS",
    "DEFAULT_COOKIE_MAX_SECONDS",
    "ConnectClaims",
    "InvalidConnectToken",
    "derive_agent_key",
    "sign_connect_token",
    "verify_connect_token",
]


# The proxy's cookie bound when the controller does not send one (an older
# controller): the controller's browser session cookie lifetime.
DEFAULT_COOKIE_MAX_SECONDS = 12 * 3600
# The longest validity window of a connect token (the controller signs them for 60 s).
CONNECT_TOKEN_MAX_SECONDS = 300
# How far the signer's clock may run ahead of the verifier's.
CLOCK_SKEW_SECONDS = 60.0


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
    # None: signed before tokens carried it (the bound then applies from now).
    issued_at: float | None = None


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
    issued_at = time.time() if now is None else now
    payload = {
        "sid": session_id,
        "uid": user_id,
        "un": user_name,
        "iat": issued_at,
        "exp": issued_at + ttl_seconds,
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
    max_lifetime: float | None = None,
) -> ConnectClaims:
    """Return the claims of a valid token for `session_id`, or raise.

    With `max_lifetime` (seconds) the token must also be bounded: its expiry at
    most that long after its issue time (``exp - iat``, both the signer's clock)
    and at most that long from now (which also bounds a token without ``iat``),
    and not issued in the future; the last two allow `CLOCK_SKEW_SECONDS` for the
    signer's clock.
    """
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
            issued_at=None if payload.get("iat") is None else float(payload["iat"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidConnectToken("malformed connect token payload") from exc
    if claims.purpose != purpose:
        raise InvalidConnectToken(f"token is for {claims.purpose!r}, not {purpose!r}")
    if claims.session_id != session_id:
        raise InvalidConnectToken("connect token is for another session")
    now = time.time() if now is None else now
    if not claims.expires_at >= now:  # NaN fails too
        raise InvalidConnectToken(f"{_noun(purpose)} has expired")
    if max_lifetime is not None:
        _check_bound(claims, now, max_lifetime, purpose)
    return claims


def _noun(purpose: str) -> str:
    return "cookie" if purpose == "cookie" else "connect token"


def _check_bound(claims: ConnectClaims, now: float, bound: float, purpose: str) -> None:
    noun = _noun(purpose)
    if claims.expires_at > now + bound + CLOCK_SKEW_SECONDS:
        raise InvalidConnectToken(
            f"{noun} expires in {claims.expires_at - now:.0f} s, beyond the {bound:.0f} s"
            " this proxy allows"
        )
    iat = claims.issued_at
    if iat is None:
        return
    if not iat <= now + CLOCK_SKEW_SECONDS:
        raise InvalidConnectToken(f"{noun} is issued in the future")
    if claims.expires_at - iat > bound + 1.0:  # one signer's clock: 1 s for rounding
        raise InvalidConnectToken(
            f"{noun} is valid for {claims.expires_at - iat:.0f} s, longer than the"
            f" {bound:.0f} s this proxy allows"
        )
