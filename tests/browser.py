"""Headless Chromium for tests that must behave as a person's browser does.

Debian's Chromium (`/usr/bin/chromium`, installed by `scripts/install`) driven by Playwright
from PyPI pointed at that executable: no browser is ever downloaded. A test imports the
fixture and asks for it by name::

    from tests.browser import Browser, browser_fixture  # noqa: F401  (registers `browser`)

    async def test_page(browser: Browser) -> None:
        page = browser.page
        await page.goto(url)
        await browser.screenshot("front")      # into the test's tmp_path

Each test gets its own browser process and a fresh context (no cookies, cache or storage from
another test). When the test fails, every open page is saved as a PNG in its `tmp_path` and
the paths are printed, with the pages' console errors.

Playwright's async API, not its sync one: the tests that use a browser also run the servers
it talks to (the `LocalStack` client, small aiohttp sites) on pytest-asyncio's event loop, and
the sync API refuses to run inside a running loop; a thread for it would buy nothing but
locking.
"""

from __future__ import annotations

import html
import importlib.util
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from aiohttp import web

from tests.e2e_harness import free_port
from tests.integration import require

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, ConsoleMessage, Page

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "Browser",
    "OtherOriginPages",
    "browser_available",
    "browser_fixture",
    "posting_form",
]

CHROMIUM = Path(os.environ.get("STUDIOS_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = (
    # Root cannot use Chromium's setuid/namespace sandbox; the browser only ever loads pages
    # the test serves on the loopback address.
    "--no-sandbox",
    "--disable-gpu",
    # The rest keep Chromium from dialling Google's services on a machine with no such network
    # (each attempt would otherwise hang or log until it times out).
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# Playwright's default (30 s) hides a hung page for too long on a 2-core machine; this is still
# generous for a page served from loopback.
DEFAULT_TIMEOUT_MS = 20_000


def browser_available() -> tuple[bool, str]:
    """(usable, why not): Chromium and Playwright's Python package are both needed."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        return False, f"{CHROMIUM} is not installed (scripts/install installs Debian's chromium)"
    if importlib.util.find_spec("playwright") is None:
        return False, "playwright is not installed (pip install -e .[test])"
    return True, ""


@dataclass
class Browser:
    """One test's browser context and its first page."""

    context: BrowserContext
    page: Page
    artifacts: Path
    console_errors: list[str] = field(default_factory=list)
    _shots: int = 0

    async def new_page(self) -> Page:
        """Another tab in the same context (it shares the cookies)."""
        page = await self.context.new_page()
        self._watch(page)
        return page

    async def screenshot(self, name: str, page: Page | None = None) -> Path:
        """A full-page PNG of `page` (default: the first page) in the test's tmp_path."""
        self._shots += 1
        path = self.artifacts / f"{self._shots:02d}-{name}.png"
        await (page or self.page).screenshot(path=str(path), full_page=True)
        return path

    async def wait_past_network_change(
        self, wait: Callable[[], Awaitable[object]], page: Page | None = None
    ) -> None:
        """`await wait()`; if it times out after Chromium dropped the page's loads with
        ERR_NETWORK_CHANGED, reload the page once and wait again.

        Chromium aborts its open requests when it decides the host's network changed,
        a known source of flaky browser tests on hosts that add and remove container
        interfaces (seen once in CI: Xpra's client never connected, the console said
        ERR_NETWORK_CHANGED; adding a veth pair by hand did not trigger it here). That
        is the test host, not the studio; any other timeout fails as it is."""
        from playwright.async_api import TimeoutError as PlaywrightTimeout

        page = page or self.page
        try:
            await wait()
        except PlaywrightTimeout:
            if not any("ERR_NETWORK_CHANGED" in line for line in self.console_errors):
                raise
            print(f"{page.url}: loads dropped with ERR_NETWORK_CHANGED; reloading once")
            await page.reload()
            await wait()

    async def cookie_names(self, url: str) -> set[str]:
        """Names of the cookies this context would send to `url`."""
        return {c.get("name", "") for c in await self.context.cookies(url)}

    def _watch(self, page: Page) -> None:
        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                self.console_errors.append(f"{page.url}: {message.text}")

        page.on("console", on_console)


# Named apart from its fixture name so that a test's `browser` argument does not shadow the
# imported function (ruff F811).
@pytest.fixture(name="browser")
async def browser_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Browser]:
    ok, why = browser_available()
    require(ok, why)
    from playwright.async_api import async_playwright

    # A test's failure is counted before its fixtures are torn down: a rise in the session's
    # count during this test means this test failed (no conftest hook needed).
    failed_before = request.session.testsfailed
    artifacts = tmp_path / "browser"
    artifacts.mkdir()
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS), headless=True
        )
        try:
            context = await chromium.new_context(viewport={"width": 1280, "height": 800})
            context.set_default_timeout(DEFAULT_TIMEOUT_MS)
            page = await context.new_page()
            session = Browser(context=context, page=page, artifacts=artifacts)
            session._watch(page)
            yield session
            if request.session.testsfailed > failed_before:
                await _save_failure(session)
            await context.close()
        finally:
            await chromium.close()


async def _save_failure(session: Browser) -> None:
    for index, page in enumerate(session.context.pages):
        if page.is_closed():
            continue
        try:
            path = await session.screenshot(f"failure-{index}", page)
        except Exception as exc:  # the page may be what broke; its URL still helps
            print(f"browser page {index} ({page.url}): no screenshot: {exc}")
        else:
            print(f"browser page {index} ({page.url}): screenshot {path}")
    for line in session.console_errors:
        print(f"browser console error: {line}")


class OtherOriginPages:
    """Pages of another origin, for tests of what a browser lets a foreign page do to the
    controller (cross-site request forgery): an aiohttp site on 127.0.0.1, on a port of
    its own, serving `GET /{name}` from `pages[name](request)`, an HTML document.

    The same port under 127.0.0.1 is another origin of the controller's site (the browser
    sends its SameSite=Lax cookie along); under `attacker.localhost` (loopback in Chromium)
    it is another site. `?referrer=none` makes any page hide its referrer, so the browser
    sends `Origin: null` with what the page posts."""

    def __init__(self, pages: Mapping[str, Callable[[web.Request], str]]) -> None:
        self.pages = dict(pages)
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    def origin(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{name}", self._page)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def __aenter__(self) -> OtherOriginPages:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _page(self, request: web.Request) -> web.Response:
        make = self.pages.get(request.match_info["name"])
        if make is None:
            raise web.HTTPNotFound()
        headers = {}
        if request.query.get("referrer") == "none":
            headers["Referrer-Policy"] = "no-referrer"
        return web.Response(text=make(request), content_type="text/html", headers=headers)


def posting_form(action: str, fields: Mapping[str, str] | None = None) -> str:
    """A page that posts a form of hidden `fields` to `action` as soon as it loads."""
    inputs = "".join(
        f'<input type=hidden name="{html.escape(k, quote=True)}" '
        f'value="{html.escape(v, quote=True)}">'
        for k, v in (fields or {}).items()
    )
    return (
        f'<!doctype html><form method=post action="{html.escape(action, quote=True)}">'
        f"{inputs}</form><script>document.forms[0].submit()</script>"
    )
