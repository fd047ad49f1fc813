"""The Studios console in headless Chromium, against a real controller and agent.

A person signs in, adds a studio and watches it reach `running` without reloading, connects
(the tool opens in a new tab), sees a second user's avatar appear as that user connects,
stops the studio, renames its checkpoint, adds a studio as new from it, and signs out. A
view-role user sees no action and cannot post one even with the page's CSRF token; pages of
another origin cannot post with the cookie. axe-core checks every main screen (no serious or
critical violation), and screenshots at 1280x800 and 390x844 are kept in tests/artifacts/.

The local runtime with the python-http template: the console does not need podman.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.browser import (  # noqa: F401
    CHROMIUM_ARGS,
    Browser,
    OtherOriginPages,
    browser_fixture,
    posting_form,
)
from tests.e2e_harness import LocalStack

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, Page, ViewportSize

pytestmark = pytest.mark.e2e

TEMPLATE = "studios/python-http:3.11-0.1"
AXE = Path(__file__).resolve().parents[1] / "vendor" / "axe.min.js"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "console"
LAPTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
# Long enough for a start on a loaded 2-core machine; the console shows it live.
RUNNING_MS = 90_000


@pytest.fixture(scope="module", autouse=True)
def _artifacts() -> None:
    # Each run overwrites its screenshots by name; one test alone keeps the other's.
    ARTIFACTS.mkdir(parents=True, exist_ok=True)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[LocalStack]:
    # Directory volumes: loop devices are a shared, scarce resource on the test machine.
    async with LocalStack(tmp_path / "stack", agent_args=("--volume-kind", "directory")) as s:
        yield s


async def _context(browser: Browser) -> BrowserContext:
    """A fresh browser profile (own cookies) of the test's Chromium.

    CSP bypassed only so that the test can inject axe-core; the console's own code runs
    under its policy in every other respect (nothing it does is inline).
    """
    chromium = browser.context.browser
    assert chromium is not None
    context = await chromium.new_context(viewport=LAPTOP, bypass_csp=True)
    context.set_default_timeout(20_000)
    return context


async def _sign_in(page: Page, controller: str, token: str) -> None:
    await page.goto(f"{controller}/auth/sign-in")
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"{controller}/")
    await page.wait_for_selector("body[data-list-loaded]")
    await page.wait_for_selector("body[data-live=on]")


async def _axe(page: Page, screen: str) -> None:
    """No serious or critical accessibility violation on the page as it is now."""
    if not await page.evaluate("() => typeof window.axe !== 'undefined'"):
        await page.add_script_tag(path=str(AXE))
    violations: list[dict[str, Any]] = await page.evaluate(
        """async () => {
            const r = await axe.run(document, {resultTypes: ['violations']});
            return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                targets: v.nodes.slice(0, 5).map(n => n.target.join(' '))}));
        }"""
    )
    bad = [v for v in violations if v["impact"] in ("serious", "critical")]
    assert not bad, f"{screen}: axe-core violations:\n{json.dumps(bad, indent=1)}"


async def _shot(page: Page, name: str) -> None:
    """`name` at laptop and phone sizes, then back to the laptop."""
    await page.screenshot(path=str(ARTIFACTS / f"{name}-1280x800.png"), full_page=True)
    await page.set_viewport_size(PHONE)
    await page.screenshot(path=str(ARTIFACTS / f"{name}-390x844.png"), full_page=True)
    await _axe(page, f"{name} on a phone")
    await page.set_viewport_size(LAPTOP)


async def _mark_no_reload(page: Page) -> None:
    await page.evaluate("() => { window.__noReload = true; }")


async def _assert_not_reloaded(page: Page) -> None:
    assert await page.evaluate("() => window.__noReload === true"), "the page was reloaded"


def _row(page: Page, sid: str) -> str:
    return f'tr[data-session="{sid}"]'


async def test_console_lifecycle_live_for_two_users(browser: Browser, stack: LocalStack) -> None:
    controller = stack.controller.url
    bob_token = stack.controller.add_user("bob", "maintain")
    alice = await _context(browser)
    page = await alice.new_page()
    await _sign_in(page, controller, stack.controller.admin_token)
    await page.get_by_text("Signed in as admin").wait_for()
    assert await page.get_by_text("your role: owner").is_visible()
    await _axe(page, "empty list")

    # Add a studio; its name is checked as it is typed.
    await page.get_by_role("link", name="Add studio").click()
    await page.get_by_label("Name").fill("console-one")
    await page.get_by_text("Name available").wait_for()
    await page.get_by_label("Template").select_option(TEMPLATE)
    options = await page.get_by_label("Template").locator("option").all_inner_texts()
    assert any("python-http" in o for o in options), options
    await _axe(page, "add form")
    await _shot(page, "add-form")
    await page.get_by_role("button", name="Add", exact=True).click()
    await page.wait_for_url("**/#/studio/*")
    sid = urlsplit(page.url).fragment.rsplit("/", 1)[-1]
    await _mark_no_reload(page)

    # It reaches running on screen, through the event stream: no reload, no polling.
    await page.wait_for_selector(
        '#live-card [data-status="running"]', timeout=RUNNING_MS, state="attached"
    )
    await _assert_not_reloaded(page)
    await _axe(page, "detail running")
    await _shot(page, "detail-running")

    # Connect opens the tool in a new tab.
    async with alice.expect_page() as opened:
        await page.get_by_role("link", name="Connect to console-one").click()
    tool = await opened.value
    await tool.get_by_role("heading", name="Directory listing for /").wait_for()
    await tool.close()

    # The list; a second user connects from their own browser and appears as an avatar.
    await page.get_by_role("link", name="← All studios").click()
    await page.wait_for_selector(_row(page, sid))
    await _mark_no_reload(page)
    bob = await _context(browser)
    bob_page = await bob.new_page()
    await _sign_in(bob_page, controller, bob_token)
    async with bob.expect_page() as bob_opened:
        await bob_page.get_by_role("link", name="Connect to console-one").click()
    bob_tool = await bob_opened.value
    await bob_tool.get_by_role("heading", name="Directory listing for /").wait_for()
    await page.wait_for_selector(f'{_row(page, sid)} .avatar[data-user="bob"]', timeout=30_000)
    await _assert_not_reloaded(page)
    assert await page.locator(f'{_row(page, sid)} .avatar[data-user="bob"]').inner_text() == "B"
    await _axe(page, "list with avatars")
    await _shot(page, "list-running")
    await bob.close()

    # Stop, live.
    await page.get_by_role("button", name="Stop console-one").click()
    await page.wait_for_selector(f'{_row(page, sid)} [data-status="stopped"]', timeout=60_000)
    await _assert_not_reloaded(page)

    # Rename the checkpoint the stop saved.
    await page.locator(_row(page, sid)).get_by_role("link", name="console-one", exact=True).click()
    checkpoint = page.locator("#checkpoints tr[data-checkpoint]").first
    await checkpoint.wait_for()
    old_name = await checkpoint.locator(".cp-name").inner_text()
    await page.get_by_role("button", name=f"Rename checkpoint {old_name}").click()
    await page.get_by_label(f"New name of checkpoint {old_name}").fill("before-clone")
    await page.get_by_role("button", name="Save").click()
    await page.locator("#checkpoints .cp-name", has_text="before-clone").wait_for()
    await _axe(page, "detail stopped")
    await _shot(page, "detail-stopped")

    # Add as new from that checkpoint: inherited fields shown fixed.
    await page.get_by_role("link", name="Add as new from checkpoint before-clone").click()
    await page.locator("#from-checkpoint", has_text="before-clone").wait_for()
    assert await page.get_by_label("Template").is_disabled()
    assert await page.get_by_label("Compute environment").is_disabled()
    await page.get_by_label("Name").fill("console-two")
    await page.get_by_text("Name available").wait_for()
    await page.get_by_label("Start it now").uncheck()
    await _axe(page, "add as new form")
    await page.get_by_role("button", name="Add", exact=True).click()
    await page.get_by_role("heading", name="console-two").wait_for()
    await page.get_by_role("link", name="console-one, checkpoint before-clone").wait_for()

    # Sign out.
    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url(f"{controller}/auth/sign-in")
    await page.goto(f"{controller}/")
    await page.get_by_text("Not signed in").wait_for()
    await alice.close()


async def test_view_role_and_other_origins_cannot_act(browser: Browser, stack: LocalStack) -> None:
    assert stack.api is not None
    controller = stack.controller.url
    _, made = await stack.api.request(
        "POST",
        "/studios?autoStart=false",
        {"name": "look-only", "computeEnvId": stack.compute_env_id, "dataStudioToolUrl": TEMPLATE},
        expect=200,
    )
    sid = made["studio"]["sessionId"]
    viewer_token = stack.controller.add_user("vera", "view")

    # A view-role user sees the studio but no action at all.
    context = await _context(browser)
    page = await context.new_page()
    await _sign_in(page, controller, viewer_token)
    row = page.locator(_row(page, sid))
    await row.wait_for()
    assert await page.get_by_text("your role: view").is_visible()
    assert await row.locator(".actions button, .actions a").count() == 0
    assert await page.get_by_role("link", name="Add studio").count() == 0
    await _axe(page, "list as view role")
    await _shot(page, "list-view-role")
    await row.get_by_role("link", name="look-only").click()
    await page.get_by_role("heading", name="look-only").wait_for()
    assert await page.locator("main .actions button, main .actions a").count() == 0
    assert await page.get_by_role("button", name="Rename").count() == 0

    # A crafted request with the page's own CSRF token still meets the role check.
    crafted = await page.evaluate(
        """async (sid) => {
            const csrf = document.querySelector('meta[name=studios-csrf]').content;
            const r = await fetch(`/studios/${sid}/start?workspaceId=1`,
                {method: 'PUT', headers: {'X-Studios-CSRF': csrf}});
            return [r.status, (await r.json()).message];
        }""",
        sid,
    )
    assert crafted[0] == 403 and "role 'view'" in crafted[1], crafted
    csrf = await page.locator("meta[name=studios-csrf]").get_attribute("content")
    cookies = {c.get("name", ""): c.get("value", "") for c in await context.cookies(controller)}
    await context.close()

    # The owner, signed in, visits pages of another origin: their posts carry the cookie but
    # are refused (no CSRF header, or a foreign Origin), and the studio is untouched.
    owner = await _context(browser)
    owner_page = await owner.new_page()
    await _sign_in(owner_page, controller, stack.controller.admin_token)
    target = f"{controller}/studios/{sid}/cancel?workspaceId=1"
    attacker = OtherOriginPages(
        {
            "form": lambda _: posting_form(target),
            # A script can send the cookie (no-cors) but cannot set the CSRF header there.
            "fetch": lambda _: (
                "<!doctype html><script>fetch("
                f"{json.dumps(target)}, {{method: 'POST', mode: 'no-cors', "
                "credentials: 'include', body: 'x'})</script>"
            ),
        }
    )
    await attacker.start()
    try:
        for kind in ("form", "fetch"):
            async with owner_page.expect_response(
                lambda r: r.url.startswith(f"{controller}/studios/") and r.request.method == "POST"
            ) as posted:
                await owner_page.goto(f"{attacker.origin()}/{kind}")
            answer = await posted.value
            assert answer.status == 403, (kind, answer.status, await answer.request.all_headers())
            # 403, not 401: the browser did send the cookie (same site, another origin), and
            # the controller refused the write for its origin and missing CSRF header.
            if kind == "form":
                # The form's navigation shows the answer as the page.
                await owner_page.wait_for_load_state()
                text = await owner_page.inner_text("body")
                assert "refused" in text and attacker.origin() in text, text
    finally:
        await attacker.close()
    _, studio = await stack.api.request("GET", f"/studios/{sid}", expect=200)
    assert studio["statusInfo"]["status"] == "stopped"

    # Outside a browser: the viewer's cookie and token from a foreign Origin, or without the
    # token, are refused before the role is even looked at.
    cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
    async with aiohttp.ClientSession() as http:
        url = f"{controller}/studios/{sid}/start?workspaceId=1"
        for headers, why in (
            ({"X-Studios-CSRF": csrf or "", "Origin": attacker.origin()}, "origin"),
            ({"Origin": controller}, "X-Studios-CSRF"),
            ({"X-Studios-CSRF": "forged", "Origin": controller}, "X-Studios-CSRF"),
        ):
            async with http.put(url, headers={**headers, "Cookie": cookie}) as resp:
                body = await resp.json()
                assert resp.status == 403 and why in body["message"], (headers, body)
    # Still signed in after all that: nothing signed the owner out either.
    await owner_page.goto(f"{controller}/")
    await owner_page.get_by_text("Signed in as admin").wait_for()
    await owner_page.get_by_role("button", name="Sign out").click()
    await owner_page.wait_for_url(f"{controller}/auth/sign-in")
    await owner.close()
