"""Browser sign-in in headless Chromium, through the real controller, agent and proxy.

A person opens a studio's `studioUrl` signed out, lands on the sign-in page, types an API
token, and is taken through the proxy to the tool's page; signing out from the controller's
page sends the next `studioUrl` back to the sign-in page. Pages of other origins that post
forms to the sign-in and sign-out endpoints are refused, the browser keeping no new cookie.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.browser import (  # noqa: F401  (registers `browser`)
    Browser,
    OtherOriginPages,
    browser_fixture,
    posting_form,
)
from tests.e2e_harness import AgentProcess, LocalStack

pytestmark = pytest.mark.e2e

TEMPLATE = "studios/python-http:3.11-0.1"
COOKIE = "studios-session"
MARKER = "written-for-the-browser.txt"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[LocalStack]:
    # Directory volumes: this test is about browsers, and loop devices are a shared, scarce
    # resource on the test machine.
    async with LocalStack(tmp_path / "stack", agent_args=("--volume-kind", "directory")) as s:
        yield s


async def _running_studio(stack: LocalStack) -> dict[str, Any]:
    assert stack.api is not None
    _, body = await stack.api.request(
        "POST",
        "/studios",
        {"name": "browser", "computeEnvId": stack.compute_env_id, "dataStudioToolUrl": TEMPLATE},
        expect=200,
    )
    return await stack.api.wait_status(body["studio"]["sessionId"], "running", timeout=90)


def _root_dir(agent: AgentProcess, session_id: str) -> Path:
    listing = agent.cli("sessions")
    sessions = listing["sessions"] if isinstance(listing, dict) else listing
    for session in sessions:
        if session.get("sessionId", session.get("id")) == session_id:
            return Path(session["rootDir"])
    raise AssertionError(f"session {session_id} not in `studio-agent sessions`: {listing}")


async def _sign_in_through_the_form(browser: Browser, token: str) -> None:
    page = browser.page
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Sign in").click()


async def test_studio_url_sign_in_tool_page_and_sign_out(
    browser: Browser, stack: LocalStack
) -> None:
    studio = await _running_studio(stack)
    sid = studio["sessionId"]
    assert stack.agent is not None
    root = _root_dir(stack.agent, sid)
    (root / MARKER).write_text("hello from the session root\n")
    controller = stack.controller.url
    page = browser.page

    await page.goto(studio["studioUrl"])
    # Signed out: the controller sends the browser to its sign-in page, remembering where to.
    assert urlsplit(page.url).path == "/auth/sign-in"
    await page.get_by_role("heading", name="Sign in to Studios").wait_for()
    await browser.screenshot("sign-in")

    async with page.expect_response(
        lambda r: r.url.startswith(f"{controller}/auth/sign-in") and r.request.method == "POST"
    ) as posted:
        await _sign_in_through_the_form(browser, stack.controller.admin_token)
    answer = await posted.value
    assert answer.status == 303, f"sign-in answered {answer.status}: {await answer.text()}"

    # Through the connect redirect and the proxy to the tool: http.server lists the root.
    await page.wait_for_url(f"http://{sid}.localhost:*/")
    await page.get_by_role("heading", name="Directory listing for /").wait_for()
    assert await page.get_by_role("link", name=MARKER).is_visible()
    await browser.screenshot("tool")
    assert COOKIE in await browser.cookie_names(controller)
    # The controller's cookie is host-only: the tool's host (untrusted code) never gets it.
    assert COOKIE not in await browser.cookie_names(page.url)

    await page.get_by_role("link", name=MARKER).click()
    await page.wait_for_url(f"**/{MARKER}")
    assert (await page.inner_text("body")).strip() == "hello from the session root"

    # Sign out with the control on the controller's page.
    await page.goto(f"{controller}/")
    await page.get_by_text("Signed in as admin").wait_for()
    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url(f"{controller}/auth/sign-in")
    assert COOKIE not in await browser.cookie_names(controller)

    await page.goto(studio["studioUrl"])
    assert urlsplit(page.url).path == "/auth/sign-in"
    await page.get_by_role("heading", name="Sign in to Studios").wait_for()


@pytest.fixture
async def attacker(stack: LocalStack) -> AsyncIterator[OtherOriginPages]:
    """Pages of another origin that post a form to the controller as soon as they load."""
    # The attacker signs victims in with a token of its own (login CSRF).
    assert stack.api is not None
    _, made = await stack.api.request("POST", "/tokens", {"name": "attacker"}, expect=200)
    controller, token = stack.controller.url, made["accessKey"]
    async with OtherOriginPages(
        {
            "sign-in": lambda _: posting_form(
                f"{controller}/auth/sign-in", {"token": token, "next": "/"}
            ),
            "sign-out": lambda _: posting_form(f"{controller}/auth/sign-out"),
        }
    ) as pages:
        yield pages


# Another site (`attacker.localhost` resolves to loopback in Chromium), another origin of the
# same site (the controller's host on another port: Sec-Fetch-Site is then `same-site`), and a
# page that hides its origin.
ATTACK_PAGES = [
    ("attacker.localhost", ""),
    ("127.0.0.1", ""),
    ("attacker.localhost", "?referrer=none"),
]


async def _attack(browser: Browser, url: str, action: str) -> tuple[int, str]:
    page = browser.page
    async with page.expect_response(
        lambda r: urlsplit(r.url).path == action and r.request.method == "POST"
    ) as posted:
        await page.goto(url)
    answer = await posted.value
    await page.wait_for_load_state()
    return answer.status, await page.inner_text("body")


async def test_cross_site_form_posts_are_refused(
    browser: Browser, stack: LocalStack, attacker: OtherOriginPages
) -> None:
    controller = stack.controller.url
    for host, query in ATTACK_PAGES:
        status, text = await _attack(
            browser, f"{attacker.origin(host)}/sign-in{query}", "/auth/sign-in"
        )
        assert status == 403, (host, query, text)
        assert "refused" in text, (host, query, text)
        assert COOKIE not in await browser.cookie_names(controller), (host, query)
    await browser.screenshot("refused-sign-in")

    # Signed in for real, a foreign page cannot sign this browser out either.
    page = browser.page
    await page.goto(f"{controller}/auth/sign-in")
    await _sign_in_through_the_form(browser, stack.controller.admin_token)
    await page.get_by_text("Signed in as admin").wait_for()
    before = {c.get("value") for c in await browser.context.cookies(controller)}
    for host, query in ATTACK_PAGES:
        status, text = await _attack(
            browser, f"{attacker.origin(host)}/sign-out{query}", "/auth/sign-out"
        )
        assert status == 403, (host, query, text)
        assert "refused" in text, (host, query, text)
        after = {c.get("value") for c in await browser.context.cookies(controller)}
        assert after == before, (host, query)
    await page.goto(f"{controller}/")
    await page.get_by_text("Signed in as admin").wait_for()
