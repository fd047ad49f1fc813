"""Browser sign-in: the session cookie, where it is accepted, how it dies, and safe `next`.

Cookies are handled by hand (a DummyCookieJar session): every test says which
cookie it sends, so nothing leaks from one request to the next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from studios.agent.v1 import agent_pb2 as pb

from controller.models import ApiToken
from controller.signin import SIGNIN_KEY, derive_session_key, safe_next, sign_session
from studios_shared.connect_token import verify_connect_token
from tests.conftest import ControllerHarness, check_response
from tests.fake_agent import FakeAgent

COOKIE = "studios-session"


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    text: str
    json: Any

    @property
    def location(self) -> str:
        return str(self.headers.get("Location", ""))

    def set_cookie(self, name: str = COOKIE) -> str:
        """The raw Set-Cookie header for `name` (asserting there is one)."""
        found = [c for c in self.headers.getall("Set-Cookie", []) if c.startswith(f"{name}=")]
        assert found, f"no Set-Cookie for {name}: {self.headers}"
        return found[0]

    def cookie_value(self, name: str = COOKIE) -> str:
        return self.set_cookie(name).split(";", 1)[0].split("=", 1)[1]


class Browser:
    """Requests with explicit cookies and no redirects, each checked against openapi.yaml."""

    def __init__(self, h: ControllerHarness) -> None:
        self.h = h
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())

    async def __call__(
        self,
        method: str,
        path: str,
        *,
        cookie: str | None = None,
        bearer: str | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Answer:
        hdrs = dict(headers or {})
        if cookie is not None:
            hdrs["Cookie"] = f"{COOKIE}={cookie}"
        if bearer is not None:
            hdrs["Authorization"] = f"Bearer {bearer}"
        async with self.http.request(
            method, self.h.url + path, headers=hdrs, allow_redirects=False, **kwargs
        ) as resp:
            text = await resp.text()
            body = await resp.json() if resp.content_type == "application/json" else None
            check_response(method, path, resp.status, resp.content_type, body)
            return Answer(resp.status, resp.headers, text, body)

    async def sign_in(self, token: str, next_path: str | None = None) -> Answer:
        form = {"token": token}
        if next_path is not None:
            form["next"] = next_path
        return await self("POST", "/auth/sign-in", data=form, headers={"Accept": "text/html"})

    async def close(self) -> None:
        await self.http.close()


@pytest.fixture
async def browser(controller_harness: ControllerHarness) -> AsyncIterator[Browser]:
    b = Browser(controller_harness)
    yield b
    await b.close()


def _session_key(h: ControllerHarness) -> bytes:
    return derive_session_key(bytes.fromhex((h.data_dir / "connect-key").read_text().strip()))


async def test_sign_in_form_sets_a_cookie_that_authenticates_gets(
    controller_harness: ControllerHarness, browser: Browser
) -> None:
    page = await browser("GET", "/auth/sign-in?next=/studios%3FworkspaceId%3D1")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert 'name=next value="/studios?workspaceId=1"' in page.text
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    # Browsers then send this page's Origin with its form (under no-referrer they send null).
    assert page.headers["Referrer-Policy"] == "same-origin"

    signed = await browser.sign_in(controller_harness.admin_token, "/studios?workspaceId=1")
    # Not straight to next: to the signed-in page on this origin, which continues there.
    assert signed.status == 303
    assert signed.location == "/auth/sign-in?next=/studios%3FworkspaceId%3D1"
    raw = signed.set_cookie().lower()
    for attribute in ("httponly", "samesite=lax", "path=/", "max-age=43200"):
        assert attribute in raw, raw
    # Host-only, and not Secure on a plain-http controller.
    assert "domain=" not in raw and "secure" not in raw
    cookie = signed.cookie_value()

    onward = await browser("GET", signed.location, cookie=cookie)
    assert onward.status == 200 and "Signed in as admin" in onward.text
    assert '<meta http-equiv=refresh content="0; url=/studios?workspaceId=1">' in onward.text
    assert onward.headers["Referrer-Policy"] == "same-origin"
    # Without the cookie (or with a dead one) the same URL is the form.
    again = await browser("GET", signed.location)
    assert again.status == 200 and 'name=next value="/studios?workspaceId=1"' in again.text
    again = await browser("GET", signed.location, cookie="garbage")
    assert again.status == 200 and "http-equiv=refresh" not in again.text
    # A signed-in browser on the bare sign-in page can still sign in with another token.
    bare = await browser("GET", "/auth/sign-in", cookie=cookie)
    assert bare.status == 200 and "name=token" in bare.text

    me = await browser("GET", "/user-info", cookie=cookie)
    assert me.status == 200 and me.json["user"]["userName"] == "admin"
    listed = await browser("GET", "/studios", cookie=cookie)
    assert listed.status == 200 and listed.json["totalSize"] == 0

    home = await browser("GET", "/", cookie=cookie)
    assert home.status == 200 and "Signed in as admin" in home.text
    home = await browser("GET", "/")
    assert home.status == 200 and "Not signed in" in home.text

    out = await browser("POST", "/auth/sign-out", headers={"Accept": "text/html"})
    assert out.status == 303 and out.location == "/auth/sign-in"
    assert "max-age=0" in out.set_cookie().lower()
    out = await browser("POST", "/auth/sign-out")
    assert out.status == 204 and "max-age=0" in out.set_cookie().lower()


async def test_json_sign_in_and_bad_tokens(
    controller_harness: ControllerHarness, browser: Browser
) -> None:
    h = controller_harness
    ok = await browser("POST", "/auth/sign-in", json={"token": h.admin_token, "next": "//evil"})
    assert ok.status == 200
    assert ok.json["userName"] == "admin" and ok.json["userId"] == 1 and ok.json["next"] == "/"
    assert ok.json["expiresAt"].endswith("Z")
    assert ok.cookie_value()

    bad = await browser("POST", "/auth/sign-in", json={"token": "not-a-token"})
    assert bad.status == 401 and bad.json["message"] == "invalid API token"
    assert "Set-Cookie" not in bad.headers
    missing = await browser("POST", "/auth/sign-in", json={})
    assert missing.status == 400 and "token" in missing.json["message"]
    wrong_type = await browser("POST", "/auth/sign-in", json={"token": 5})
    assert wrong_type.status == 400 and "token" in wrong_type.json["message"]
    not_json = await browser(
        "POST", "/auth/sign-in", data=b"{", headers={"Content-Type": "application/json"}
    )
    assert not_json.status == 400 and "JSON" in not_json.json["message"]

    # A form gets the form again, with the reason, and keeps the (safe) next.
    form = await browser.sign_in("not-a-token", "/studios")
    assert form.status == 401 and "invalid API token" in form.text
    assert 'name=next value="/studios"' in form.text
    empty = await browser.sign_in("  ")
    assert empty.status == 400 and "token" in empty.text

    # Login CSRF: a sign-in posted from another site is refused.
    foreign = await browser(
        "POST",
        "/auth/sign-in",
        json={"token": h.admin_token},
        headers={"Origin": "https://evil.example"},
    )
    assert foreign.status == 403 and "evil.example" in foreign.json["message"]
    cross = await browser(
        "POST",
        "/auth/sign-in",
        json={"token": h.admin_token},
        headers={"Sec-Fetch-Site": "cross-site"},
    )
    assert cross.status == 403
    same = await browser(
        "POST", "/auth/sign-in", json={"token": h.admin_token}, headers={"Origin": h.url}
    )
    assert same.status == 200


# What browsers send for a form posted by: the controller's own page (allowed), another
# origin of the same site (a tool on `<sessionId>.<proxy domain>`), another site, and a page
# that hides its origin (`Origin: null`, e.g. under `Referrer-Policy: no-referrer`).
FOREIGN_FORMS = {
    "another origin": {"Origin": "http://127.0.0.1:1", "Sec-Fetch-Site": "same-site"},
    "a sibling host": {"Origin": "http://abcd1234.localhost:7070", "Sec-Fetch-Site": "same-site"},
    "another site": {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
    "a hidden origin": {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
    # Browsers without Fetch metadata (older Safari) send Origin alone.
    "null, no metadata": {"Origin": "null"},
    "same-site, no Origin": {"Sec-Fetch-Site": "same-site"},
}


async def test_forms_from_other_origins_are_refused(
    controller_harness: ControllerHarness, browser: Browser
) -> None:
    h = controller_harness
    html = {"Accept": "text/html"}
    own = {"Origin": h.url, "Sec-Fetch-Site": "same-origin"}
    for name, headers in FOREIGN_FORMS.items():
        form = await browser(
            "POST", "/auth/sign-in", data={"token": h.admin_token}, headers={**html, **headers}
        )
        assert form.status == 403 and "sign-in" in form.text and "refused" in form.text, name
        assert "Set-Cookie" not in form.headers, name
        api = await browser("POST", "/auth/sign-in", json={"token": h.admin_token}, headers=headers)
        assert api.status == 403 and "refused" in api.json["message"], name
        assert "Set-Cookie" not in api.headers, name
    signed = await browser(
        "POST", "/auth/sign-in", data={"token": h.admin_token}, headers={**html, **own}
    )
    assert signed.status == 303
    cookie = signed.cookie_value()

    # Sign-out needs no credentials, so it is guarded the same way.
    for name, headers in FOREIGN_FORMS.items():
        for accept in ({"Accept": "text/html"}, {}):
            out = await browser(
                "POST", "/auth/sign-out", headers={**accept, **headers}, cookie=cookie
            )
            assert out.status == 403 and "sign-out" in out.text and "refused" in out.text, name
            assert "Set-Cookie" not in out.headers, name
            if not accept:
                assert "refused" in out.json["message"], name
    assert (await browser("GET", "/user-info", cookie=cookie)).status == 200
    out = await browser("POST", "/auth/sign-out", headers={**html, **own})
    assert out.status == 303 and "max-age=0" in out.set_cookie().lower()


async def test_cookie_alone_authorises_only_get_and_head(
    controller_harness: ControllerHarness, browser: Browser
) -> None:
    h = controller_harness
    cookie = (await browser.sign_in(h.admin_token)).cookie_value()
    for method, path, body in (
        ("POST", "/tokens", {"name": "from-a-cookie"}),
        ("POST", "/studios", {"name": "x", "computeEnvId": h.compute_env_id}),
        ("DELETE", "/tokens/1", None),
        ("PUT", "/studios/deadbeef/stop", None),
    ):
        # Without the console's CSRF header and Origin (tests/e2e/test_console.py has those).
        answer = await browser(method, path, cookie=cookie, json=body)
        assert answer.status == 403, (method, path, answer.text)
        assert "refused" in answer.json["message"]
        assert "bearer token" in answer.json["message"]
    # With a bearer token the cookie is irrelevant.
    made = await browser(
        "POST", "/tokens", cookie=cookie, bearer=h.admin_token, json={"name": "with-bearer"}
    )
    assert made.status == 200
    # HEAD is a safe method too (aiohttp serves it for every GET route).
    async with browser.http.head(
        h.url + "/user-info", headers={"Cookie": f"{COOKIE}={cookie}"}
    ) as r:
        assert r.status == 200
    # No credentials at all: the 401 points browsers to the sign-in page.
    none = await browser("GET", "/user-info")
    assert none.status == 401 and "/auth/sign-in" in none.json["message"]


async def test_bad_expired_and_tampered_cookies(
    controller_harness: ControllerHarness, browser: Browser
) -> None:
    h = controller_harness
    cookie = (await browser.sign_in(h.admin_token)).cookie_value()
    body, mac = cookie.split(".")
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    key = _session_key(h)
    token_hash = await _token_hash(h, 1)
    expired = sign_session(
        key, token_id=1, user_id=1, token_hash=token_hash, expires_at=int(time.time()) - 1
    )
    foreign = sign_session(
        b"k" * 32, token_id=1, user_id=1, token_hash=token_hash, expires_at=int(time.time()) + 60
    )
    other_user = sign_session(
        key, token_id=1, user_id=2, token_hash=token_hash, expires_at=int(time.time()) + 60
    )
    rebound = sign_session(
        key, token_id=1, user_id=1, token_hash="0" * 64, expires_at=int(time.time()) + 60
    )
    cases = {
        "bound to another token with the same id": (rebound, "deleted"),
        "tampered mac": (f"{body}.{flipped}", "not valid"),
        "tampered payload": (f"{body[:-3]}xyz.{mac}", "not valid"),
        "garbage": ("hello", "not valid"),
        "bad base64": ("!!!.???", "not valid"),
        "another key": (foreign, "not valid"),
        "expired": (expired, "expired"),
        "claims another user": (other_user, "deleted"),
    }
    for name, (value, words) in cases.items():
        answer = await browser("GET", "/user-info", cookie=value)
        assert answer.status == 401, name
        assert words in answer.json["message"] and "/auth/sign-in" in answer.json["message"], name
        # A browser opening a studioUrl with it is sent to sign in again, the cookie cleared.
        answer = await browser(
            "GET", "/studios/deadbeef/connect", cookie=value, headers={"Accept": "text/html"}
        )
        assert answer.status == 303, name
        assert answer.location == "/auth/sign-in?next=/studios/deadbeef/connect"
        assert "max-age=0" in answer.set_cookie().lower()
    # The valid one still works.
    assert (await browser("GET", "/user-info", cookie=cookie)).status == 200


async def _token_hash(h: ControllerHarness, token_id: int) -> str:
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        token = await session.get(ApiToken, token_id)
        assert token is not None
        return token.token_hash


async def test_cookie_dies_when_its_token_is_deleted(
    controller_harness: ControllerHarness, browser: Browser
) -> None:
    h = controller_harness
    _, made = await h.request("POST", "/tokens", {"name": "browser"}, expect=200)
    token_id, value = made["token"]["id"], made["accessKey"]
    cookie = (await browser.sign_in(value)).cookie_value()
    assert (await browser("GET", "/user-info", cookie=cookie)).status == 200
    await h.request("DELETE", f"/tokens/{token_id}", expect=204)
    dead = await browser("GET", "/user-info", cookie=cookie)
    assert dead.status == 401 and "deleted" in dead.json["message"]
    # SQLite may hand a deleted row's id to the next row: a new token with the same
    # id does not bring the old cookie back (the cookie is bound to the token's hash).
    await h.request("POST", "/tokens", {"name": "browser-2"}, expect=200)
    still_dead = await browser("GET", "/user-info", cookie=cookie)
    assert still_dead.status == 401 and "deleted" in still_dead.json["message"]
    # Other sessions are unaffected.
    admin_cookie = (await browser.sign_in(h.admin_token)).cookie_value()
    assert (await browser("GET", "/user-info", cookie=admin_cookie)).status == 200


async def test_secure_cookie_behind_an_https_public_url(
    controller_harness: ControllerHarness, browser: Browser
) -> None:
    h = controller_harness
    assert h.controller is not None and h.controller.runner is not None
    settings = h.controller.runner.app[SIGNIN_KEY]
    plain = settings.public_url
    settings.public_url = "https://studios.example.org"
    try:
        signed = await browser(
            "POST",
            "/auth/sign-in",
            json={"token": h.admin_token},
            headers={"Origin": "https://studios.example.org"},
        )
        assert signed.status == 200
        raw = signed.set_cookie("__Host-studios-session").lower()
        assert "secure" in raw and "httponly" in raw and "path=/" in raw and "domain=" not in raw
        value = signed.cookie_value("__Host-studios-session")
        async with browser.http.get(
            h.url + "/user-info", headers={"Cookie": f"__Host-studios-session={value}"}
        ) as resp:
            assert resp.status == 200
        # The plain name is not read when the secure one is in use.
        assert (await browser("GET", "/user-info", cookie=value)).status == 401
    finally:
        settings.public_url = plain


ATTACKS = [
    "//evil.com",
    "///evil.com",
    "////evil.com",
    "/\\evil.com",
    "\\\\evil.com",
    "/\\/evil.com",
    "https://evil.com",
    "http:evil.com",
    "javascript:alert(1)",
    "JavaScript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "evil.com",
    "%2F%2Fevil.com",
    "/%2F/evil.com",
    "/%2f%2fevil.com",
    "%2f%2fevil.com",
    "/%5Cevil.com",
    "/%5cevil.com",
    "%5C%5Cevil.com",
    "/%09/evil.com",
    "/\t/evil.com",
    "/%0a/evil.com",
    "/%0d%0aSet-Cookie:x=y",
    "/\r\nLocation: https://evil.com",
    "/%00/evil.com",
    "/%252F%252Fevil.com",
    "/%25252F%25252Fevil.com",
    "/%255Cevil.com",
    " //evil.com",
    "/ /evil.com",
    "/\u3002evil.com",
    "/\uff0f/evil.com",
    "/%E3%80%82evil.com",
    "/%ff",
    "",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_safe_next_refuses_attacks(attack: str) -> None:
    assert safe_next(attack) == "/"


@pytest.mark.parametrize(
    "good",
    [
        "/",
        "/studios",
        "/studios/abcd1234/connect",
        "/studios/abcd1234/connect?workspaceId=1",
        "/studios?search=status%3Arunning",
        "/a/b;c?d=e&f=g#h",
    ],
)
def test_safe_next_keeps_same_origin_paths(good: str) -> None:
    assert safe_next(good) == good


async def test_open_redirects_end_to_end(
    controller_harness: ControllerHarness, browser: Browser
) -> None:
    h = controller_harness
    for attack in ("//evil.com", "/\\evil.com", "https://evil.com", "/%2F/evil.com", "/%09/x"):
        signed = await browser.sign_in(h.admin_token, attack)
        assert signed.status == 303 and signed.location == "/auth/sign-in?next=/", attack
        onward = await browser("GET", signed.location, cookie=signed.cookie_value())
        assert '<meta http-equiv=refresh content="0; url=/">' in onward.text, attack
        page = await browser("GET", "/auth/sign-in", params={"next": attack})
        assert 'name=next value="/"' in page.text, attack
    # HTML in next is escaped in the form, never echoed raw.
    page = await browser("GET", "/auth/sign-in", params={"next": '/"><script>x</script>'})
    assert "<script>" not in page.text


async def test_browser_connect_goes_through_sign_in(
    controller_harness: ControllerHarness, browser: Browser
) -> None:
    h = controller_harness
    agent = FakeAgent(
        h.grpc_target, h.agent_token, agent_id="agent-1", compute_env_id=h.compute_env_id
    )
    await agent.connect()
    try:
        _, body = await h.request(
            "POST", "/studios", {"name": "s", "computeEnvId": h.compute_env_id}, expect=200
        )
        sid = body["studio"]["sessionId"]
        desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
        await agent.report(sid, desired.generation, pb.SESSION_STATUS_RUNNING, tool_port=1)
        for _ in range(200):
            _, studio = await h.request("GET", f"/studios/{sid}", expect=200)
            if studio["statusInfo"]["status"] == "running":
                break
            await asyncio.sleep(0.05)
        studio_url = urlsplit(studio["studioUrl"])
        path = f"{studio_url.path}?workspaceId=1"

        html = {"Accept": "text/html,application/xhtml+xml"}
        first = await browser("GET", path, headers=html)
        assert first.status == 303
        sign_in = urlsplit(first.location)
        assert sign_in.path == "/auth/sign-in"
        next_path = parse_qs(sign_in.query)["next"][0]
        assert next_path == path
        # An API client without credentials gets the 401, not a page.
        api = await browser("GET", path)
        assert api.status == 401
        # A bad bearer token is an API client's mistake: 401 even for text/html.
        bad = await browser("GET", path, bearer="nope", headers=html)
        assert bad.status == 401 and bad.json["message"] == "invalid API token"

        page = await browser("GET", first.location, headers=html)
        assert f'name=next value="{path}"' in page.text.replace("&amp;", "&")
        signed = await browser.sign_in(h.admin_token, next_path)
        assert signed.status == 303
        assert parse_qs(urlsplit(signed.location).query)["next"] == [path]
        onward = await browser("GET", signed.location, cookie=signed.cookie_value(), headers=html)
        assert f"url={path}" in onward.text.replace("&amp;", "&")
        connect = await browser("GET", path, cookie=signed.cookie_value(), headers=html)
        assert connect.status == 302
        target = urlsplit(connect.location)
        assert target.hostname == f"{sid}.localhost"
        token = parse_qs(target.query)["studio-token"][0]
        assert agent.welcome is not None
        claims = verify_connect_token(agent.welcome.connect_token_key, token, session_id=sid)
        assert claims.user_id == 1
    finally:
        await agent.close()
