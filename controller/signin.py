"""Browser sign-in: the controller's session cookie, and safe return URLs.

API clients send ``Authorization: Bearer <token>``. Browsers cannot, so
``POST /auth/sign-in`` (`controller.web_auth`) takes an API token once and
sets a session cookie that stands in for it:

- Stateless and signed: ``base64url(JSON payload) "." base64url(HMAC-SHA256)``
  with a key derived from the master key in the data directory (so it
  survives restarts and needs no table). The payload holds the API token's id,
  its user, an expiry, and a *binding*: an HMAC of the token's stored hash.
  Every use re-reads the token row: a deleted token (or a token id that SQLite
  handed to a newer token) fails the binding, so the cookie dies with the
  token it was signed in with.
- HttpOnly, SameSite=Lax, Path=/, host-only (no Domain: the cookie never
  reaches ``<sessionId>.<proxy domain>``, where tools run untrusted code), and
  Secure with the ``__Host-`` name prefix when the public URL is https (the
  prefix stops a tool on a sibling host from planting a Domain cookie).
- GET and HEAD need nothing more. Any other method (the console's writes) is
  authorised by the cookie only with a CSRF defence (`check_csrf`): the
  header ``X-Studios-CSRF`` holding the session's CSRF token (an HMAC of the
  cookie's value, so it is per session and needs no table; the console page
  embeds it) *and* an ``Origin`` that is this controller's own. A cross-site
  page can make the browser send the cookie (SameSite=Lax does not cover
  every case, e.g. same-site tools) but can neither read the token nor set
  that Origin. Bearer-token clients are unchanged. The sign-in and sign-out
  forms need no credentials; they refuse posts from other origins and sites
  (`controller.web_auth`).

`safe_next` keeps the return URL of the sign-in page on this origin.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.auth import Principal, authenticate, hash_token, mark_token_used
from controller.errors import Forbidden, Unauthorized
from controller.models import ApiToken, User, utcnow

__all__ = [
    "COOKIE_METHODS",
    "CSRF_HEADER",
    "SIGNIN_KEY",
    "SIGN_IN_PATH",
    "SignInSettings",
    "SignedIn",
    "authenticate_request",
    "browser_sign_in_redirect",
    "check_csrf",
    "csrf_token",
    "derive_session_key",
    "open_session",
    "own_origins",
    "safe_next",
    "sign_session",
    "token_row",
    "verify_session",
]

SIGN_IN_PATH = "/auth/sign-in"
# Methods the cookie alone authorises: a cookie is sent on cross-site navigations
# (SameSite=Lax), so anything else needs the CSRF header and this origin (`check_csrf`).
COOKIE_METHODS = frozenset({"GET", "HEAD"})
CSRF_HEADER = "X-Studios-CSRF"
_CSRF_LABEL = b"csrf:"
DEFAULT_TTL_SECONDS = 12 * 3600
_COOKIE = "studios-session"
_SECURE_COOKIE = "__Host-studios-session"
_KEY_LABEL = b"studios controller session cookie v1"
_BIND_LABEL = b"bind:"
# Percent-decoding rounds `safe_next` looks through (%252F%252F is two rounds).
_DECODE_ROUNDS = 4


def derive_session_key(master_key: bytes) -> bytes:
    """The cookie signing key: its own key, so a cookie can never pass as a connect token."""
    return hmac.new(master_key, _KEY_LABEL, hashlib.sha256).digest()


@dataclass(slots=True)
class SignInSettings:
    key: bytes
    ttl_seconds: int = DEFAULT_TTL_SECONDS
    # Set once the HTTP site is bound (the port may be chosen then).
    public_url: str = ""

    @property
    def secure(self) -> bool:
        return self.public_url.lower().startswith("https://")

    @property
    def cookie_name(self) -> str:
        return _SECURE_COOKIE if self.secure else _COOKIE

    def set_cookie(self, response: web.StreamResponse, value: str) -> None:
        response.set_cookie(
            self.cookie_name,
            value,
            max_age=self.ttl_seconds,
            path="/",
            httponly=True,
            samesite="Lax",
            secure=self.secure,
        )

    def clear_cookie(self, response: web.StreamResponse) -> None:
        response.del_cookie(
            self.cookie_name, path="/", secure=self.secure, httponly=True, samesite="Lax"
        )


SIGNIN_KEY = web.AppKey("signin", SignInSettings)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _binding(key: bytes, token_hash: str) -> str:
    return _b64(hmac.new(key, _BIND_LABEL + token_hash.encode(), hashlib.sha256).digest()[:16])


def sign_session(
    key: bytes, *, token_id: int, user_id: int, token_hash: str, expires_at: int
) -> str:
    payload = json.dumps(
        {
            "v": 1,
            "tid": token_id,
            "uid": user_id,
            "exp": expires_at,
            "b": _binding(key, token_hash),
        },
        separators=(",", ":"),
    ).encode()
    body = _b64(payload)
    mac = hmac.new(key, body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


async def verify_session(
    session: AsyncSession, key: bytes, value: str, *, now: float | None = None
) -> Principal:
    """The user of a session cookie value; Unauthorized saying why it is not valid."""
    tampered = Unauthorized(
        f"the session cookie is not valid (tampered or from another controller): "
        f"sign in again at {SIGN_IN_PATH}"
    )
    body, sep, mac_text = value.partition(".")
    if not sep or len(value) > 1024:
        raise tampered
    try:
        mac = _unb64(mac_text)
        expected = hmac.new(key, body.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            raise tampered
        claims = json.loads(_unb64(body))
        token_id, user_id, expires_at = int(claims["tid"]), int(claims["uid"]), int(claims["exp"])
        binding = str(claims["b"])
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeError):
        raise tampered from None
    if (time.time() if now is None else now) >= expires_at:
        raise Unauthorized(f"the session has expired: sign in again at {SIGN_IN_PATH}")
    row = (
        await session.execute(
            select(ApiToken, User)
            .join(User, User.id == ApiToken.user_id)
            .where(ApiToken.id == token_id)
        )
    ).first()
    if (
        row is None
        or row[0].user_id != user_id
        or not hmac.compare_digest(_binding(key, row[0].token_hash), binding)
    ):
        raise Unauthorized(
            "the API token this session was signed in with has been deleted: "
            f"sign in again at {SIGN_IN_PATH}"
        )
    api_token, user = row
    mark_token_used(api_token)
    return Principal(user_id=user.id, user_name=user.user_name, email=user.email)


async def token_row(session: AsyncSession, token: str) -> ApiToken | None:
    """The API token row of a token value, as bearer authentication finds it."""
    return await session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))


@dataclass(frozen=True, slots=True)
class SignedIn:
    user_id: int
    user_name: str
    # The cookie's value: it stands in for the API token, so it stays out of the repr.
    cookie: str = field(repr=False)
    # Unix time.
    expires_at: int


async def open_session(session: AsyncSession, settings: SignInSettings, token: str) -> SignedIn:
    """A signed session cookie for the API token `token`; Unauthorized when it is not one."""
    row = await token_row(session, token)
    user = await session.get(User, row.user_id) if row is not None else None
    if row is None or user is None:
        raise Unauthorized("invalid API token")
    row.last_used = utcnow()
    expires_at = int(time.time()) + settings.ttl_seconds
    value = sign_session(
        settings.key,
        token_id=row.id,
        user_id=user.id,
        token_hash=row.token_hash,
        expires_at=expires_at,
    )
    return SignedIn(user.id, user.user_name, value, expires_at)


def csrf_token(key: bytes, cookie: str) -> str:
    """The CSRF token of the session whose cookie value is `cookie`.

    Derived, not stored: a new sign-in (a new cookie) gets a new token, and a page of
    another origin, which cannot read the cookie (HttpOnly) nor this controller's pages,
    cannot compute it.
    """
    return _b64(hmac.new(key, _CSRF_LABEL + cookie.encode(), hashlib.sha256).digest()[:24])


def own_origins(request: web.Request) -> set[str]:
    """The origins this controller answers as: the request's own and the public URL's."""
    allowed = {f"{request.scheme}://{request.host}".lower()}
    settings = request.app.get(SIGNIN_KEY)
    if settings is not None and settings.public_url:
        parts = urlsplit(settings.public_url)
        allowed.add(f"{parts.scheme}://{parts.netloc}".lower())
    return allowed


def check_csrf(request: web.Request, key: bytes, cookie: str) -> None:
    """Forbidden unless a cookie-authenticated write comes from this controller's own page.

    Both checks, not either: the token proves the page could read this controller's
    answers; the Origin proves the browser ran it on this origin (a tool on a sibling host
    of the same site that somehow learnt a token still cannot post with it). A browser
    always sends Origin on a non-GET fetch; its absence means a page hid it or a client
    that is not a browser, neither of which needs the cookie.
    """
    origin = request.headers.get("Origin")
    if origin is None or origin.lower() not in own_origins(request):
        raise Forbidden(
            f"{request.method} with the session cookie from origin {origin or '(none)'!r} "
            "is refused (not this controller's page): use the console or a bearer token"
        )
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        raise Forbidden(
            f"{request.method} with the session cookie from another site is refused "
            f"(Sec-Fetch-Site: {site})"
        )
    sent = request.headers.get(CSRF_HEADER, "")
    if not sent or not hmac.compare_digest(sent.encode(), csrf_token(key, cookie).encode()):
        raise Forbidden(
            f"{request.method} with the session cookie needs the {CSRF_HEADER} header of "
            "this session (missing or wrong): reload the console"
        )


async def authenticate_request(request: web.Request, session: AsyncSession) -> Principal:
    """Bearer token first; else the session cookie (for writes, with `check_csrf`)."""
    header = request.headers.get("Authorization")
    if header:
        return await authenticate(session, header)
    settings = request.app.get(SIGNIN_KEY)
    cookie = request.cookies.get(settings.cookie_name) if settings is not None else None
    if settings is None or cookie is None:
        raise Unauthorized(
            "missing Authorization header (expected 'Bearer <token>'; "
            f"browsers sign in at {SIGN_IN_PATH})"
        )
    if request.method not in COOKIE_METHODS:
        check_csrf(request, settings.key, cookie)
    return await verify_session(session, settings.key, cookie)


def _is_browser_navigation(request: web.Request) -> bool:
    return request.method in COOKIE_METHODS and "text/html" in request.headers.get("Accept", "")


def _is_connect_path(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 4 and parts[1] == "studios" and parts[3] == "connect"


def browser_sign_in_redirect(request: web.Request) -> web.Response | None:
    """A 303 to the sign-in page for a browser opening a studioUrl unauthenticated.

    Only without an Authorization header: an API client with a bad token wants
    the 401 that says so. A bad cookie is cleared on the way.
    """
    settings = request.app.get(SIGNIN_KEY)
    if (
        settings is None
        or "Authorization" in request.headers
        or not _is_connect_path(request.path)
        or not _is_browser_navigation(request)
    ):
        return None
    target = safe_next(request.path_qs)
    response = web.Response(
        status=303, headers={"Location": f"{SIGN_IN_PATH}?next={quote(target, safe='/')}"}
    )
    if settings.cookie_name in request.cookies:
        settings.clear_cookie(response)
    return response


def safe_next(raw: str | None) -> str:
    """`raw` if it is a path on this origin, else "/".

    Accepted: printable ASCII starting with one "/" (not "//" or "/\\"), no
    backslash anywhere, no scheme, and the same still true after every round
    of percent-decoding (so %2F%2F, %5C, %09 and double encodings are refused).
    Browsers strip tabs and newlines and read "\\" as "/", which is why they
    are refused rather than trusted to be harmless.
    """
    if not raw:
        return "/"
    text = raw
    for _ in range(_DECODE_ROUNDS):
        if not _plain_path(text):
            return "/"
        try:
            decoded = unquote(text, errors="strict") if "%" in text else text
        except UnicodeDecodeError:
            return "/"
        if decoded == text:
            return raw
        text = decoded
    # Still changing after several rounds: nobody needs that for a real path.
    return "/"


def _plain_path(text: str) -> bool:
    if not text.startswith("/") or text.startswith(("//", "/\\")):
        return False
    if any(not (0x21 <= ord(c) <= 0x7E) for c in text):
        return False
    # No scheme is possible: a scheme ends before the first "/", and this starts with one.
    return "\\" not in text
