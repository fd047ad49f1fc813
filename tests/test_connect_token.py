"""studios_shared.connect_token: signing, and the lifetime bound a verifier enforces."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from studios_shared.connect_token import (
    CLOCK_SKEW_SECONDS,
    ConnectClaims,
    InvalidConnectToken,
    sign_connect_token,
    verify_connect_token,
)

KEY = b"u" * 32
SID = "0123abcd"
NOW = 1_800_000_000.0
HOUR = 3600.0


def _sign(ttl: float, now: float = NOW, purpose: str = "cookie") -> str:
    return sign_connect_token(
        KEY, session_id=SID, user_id=1, user_name="u", ttl_seconds=ttl, purpose=purpose, now=now
    )


def _signed(payload: dict[str, object]) -> str:
    body = json.dumps(payload).encode()
    mac = hmac.new(KEY, body, hashlib.sha256).digest()
    b64 = base64.urlsafe_b64encode
    return f"{b64(body).rstrip(b'=').decode()}.{b64(mac).rstrip(b'=').decode()}"


def _verify(
    token: str, bound: float | None = 12 * HOUR, now: float = NOW, purpose: str = "cookie"
) -> ConnectClaims:
    return verify_connect_token(
        KEY, token, session_id=SID, purpose=purpose, now=now, max_lifetime=bound
    )


def test_signing_records_the_issue_time() -> None:
    claims = _verify(_sign(HOUR))
    assert claims.issued_at == NOW and claims.expires_at == NOW + HOUR


def test_within_the_bound_passes_up_to_its_edge() -> None:
    _verify(_sign(12 * HOUR))
    _verify(_sign(12 * HOUR), now=NOW + 12 * HOUR - 1)


def test_beyond_the_bound_is_refused_however_signed() -> None:
    with pytest.raises(InvalidConnectToken, match="beyond the 43200 s"):
        _verify(_sign(365 * 24 * HOUR))
    # Without a bound (the verifier's choice) the old behaviour stays.
    assert _verify(_sign(365 * 24 * HOUR), bound=None).expires_at > NOW


def test_a_window_longer_than_the_bound_is_refused_even_when_what_is_left_fits() -> None:
    token = _sign(13 * HOUR, now=NOW - 2 * HOUR)  # 11 h left, but a 13 h window
    with pytest.raises(InvalidConnectToken, match="valid for 46800 s, longer than the 43200 s"):
        _verify(token)


def test_expired_is_refused() -> None:
    with pytest.raises(InvalidConnectToken, match="cookie has expired"):
        _verify(_sign(HOUR, now=NOW - 2 * HOUR))
    with pytest.raises(InvalidConnectToken, match="connect token has expired"):
        _verify(_sign(60, now=NOW - 61, purpose="connect"), purpose="connect", bound=300)


def test_issued_in_the_future_is_refused_beyond_the_skew() -> None:
    _verify(_sign(HOUR, now=NOW + CLOCK_SKEW_SECONDS - 1))
    with pytest.raises(InvalidConnectToken, match="issued in the future"):
        _verify(_sign(HOUR, now=NOW + CLOCK_SKEW_SECONDS + 5))


@pytest.mark.parametrize(
    "exp, iat",
    [(float("inf"), NOW), (float("nan"), NOW), (NOW + HOUR, float("nan")), (NOW + HOUR, "x")],
)
def test_non_numbers_are_refused(exp: object, iat: object) -> None:
    token = _signed(
        {"sid": SID, "uid": 1, "un": "u", "exp": exp, "iat": iat, "n": "n", "p": "cookie"}
    )
    with pytest.raises(InvalidConnectToken):
        _verify(token)


def test_a_token_without_issue_time_is_bounded_by_what_remains() -> None:
    """Tokens of a controller older than the bound carry no `iat`."""
    base = {"sid": SID, "uid": 1, "un": "u", "n": "n", "p": "connect"}
    ok = _verify(_signed({**base, "exp": NOW + 60}), purpose="connect", bound=300)
    assert ok.issued_at is None
    with pytest.raises(InvalidConnectToken, match="beyond the 300 s"):
        _verify(_signed({**base, "exp": NOW + 3600}), purpose="connect", bound=300)
