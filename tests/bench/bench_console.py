"""The console with 1,000 studios, in headless Chromium (Debian's, driven by Playwright).

A real controller and agent (`LocalStack`, local runtime); the studios are added through the
API (not started: the list is what is measured). Measured, each in the browser's own clock:

- first meaningful paint of the list: from navigation start to the frame after the first
  page of studios is in the table (a MutationObserver installed before any script runs,
  then requestAnimationFrame), over fresh browser profiles (cold caches), median and max;
- a search applied: from the input event in the search box to the frame after the matching
  rows are drawn (the console's typing debounce included), median and max;
- page weight: bytes the browser fetched for one cold load (HTML, CSS, JS and the API's
  JSON), and each asset's size.

Targets (issue 17): paint < 1 s, search < 300 ms. Prints JSON; not a test.

    python tests/bench/bench_console.py [--studios 1000] [--loads 5] [--searches 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.browser import CHROMIUM, CHROMIUM_ARGS, browser_available
from tests.e2e_harness import LocalStack, RestClient

TEMPLATE = "studios/python-http:3.11-0.1"

# Installed before the page's own scripts: records when the first rows are on screen.
_PAINT_PROBE = """
window.__listPaint = new Promise((resolve) => {
  const seen = () => document.querySelector('tr[data-session]');
  const mo = new MutationObserver(() => {
    if (!seen()) return;
    mo.disconnect();
    requestAnimationFrame(() => resolve(performance.now()));
  });
  mo.observe(document, {childList: true, subtree: true});
});
"""

_SEARCH = """
async (term) => {
  const done = new Promise((resolve) => {
    const mo = new MutationObserver(() => {
      mo.disconnect();
      requestAnimationFrame(() => resolve(performance.now()));
    });
    mo.observe(document.body, {attributes: true, attributeFilter: ['data-list-loaded']});
  });
  const input = document.getElementById('search');
  const t0 = performance.now();
  input.value = term;
  input.dispatchEvent(new Event('input', {bubbles: true}));
  const t1 = await done;
  return {ms: t1 - t0, rows: document.querySelectorAll('tr[data-session]').length};
}
"""

_WEIGHT = """
() => {
  const nav = performance.getEntriesByType('navigation')[0];
  const res = performance.getEntriesByType('resource');
  const one = (r) => ({name: r.name, bytes: r.transferSize, body: r.decodedBodySize,
    ms: Math.round(r.responseEnd - r.startTime), end: Math.round(r.responseEnd)});
  const items = [one(nav)].concat(res.filter((r) => !r.name.includes('/events')).map(one));
  return items;
}
"""


async def _add_studios(stack: LocalStack, count: int) -> float:
    # Unchecked: validating a thousand answers against openapi.yaml would dominate the setup.
    api = RestClient(stack.controller.url, stack.controller.admin_token, check=False)
    started = time.monotonic()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(count):
        queue.put_nowait(n)

    async def worker() -> None:
        while not queue.empty():
            n = queue.get_nowait()
            await api.request(
                "POST",
                "/studios?autoStart=false",
                {
                    "name": f"bench-{n:04d}",
                    "computeEnvId": stack.compute_env_id,
                    "dataStudioToolUrl": TEMPLATE,
                },
                expect=200,
            )

    try:
        await asyncio.gather(*(worker() for _ in range(6)))
    finally:
        await api.close()
    return time.monotonic() - started


async def _measure(stack: LocalStack, loads: int, searches: int) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    url = stack.controller.url
    paints: list[float] = []
    search_ms: list[float] = []
    weight: list[dict[str, Any]] = []
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS), headless=True
        )
        try:
            # Sign in once; each load then gets a fresh profile with only that cookie.
            context = await chromium.new_context()
            page = await context.new_page()
            await page.goto(f"{url}/auth/sign-in")
            await page.get_by_label("API token").fill(stack.controller.admin_token)
            await page.get_by_role("button", name="Sign in").click()
            await page.wait_for_selector("body[data-list-loaded]")
            cookies = await context.cookies(url)
            await context.close()
            for load in range(loads):
                context = await chromium.new_context(viewport={"width": 1280, "height": 800})
                await context.add_cookies(cookies)  # type: ignore[arg-type]
                await context.add_init_script(_PAINT_PROBE)
                page = await context.new_page()
                await page.goto(f"{url}/")
                paints.append(float(await page.evaluate("() => window.__listPaint")))
                await page.wait_for_selector("body[data-live=on]")
                if load == 0:
                    weight = await page.evaluate(_WEIGHT)
                    for n in range(searches):
                        result = await page.evaluate(_SEARCH, f"bench-{(n * 97) % 1000:04d}")
                        assert result["rows"] == 1, result
                        search_ms.append(float(result["ms"]))
                    # Back to everything: the first page again.
                    result = await page.evaluate(_SEARCH, "")
                    search_ms.append(float(result["ms"]))
                await context.close()
        finally:
            await chromium.close()
    total_bytes = sum(int(w["bytes"]) for w in weight)
    return {
        "first_meaningful_paint_ms": {
            "median": round(statistics.median(paints), 1),
            "max": round(max(paints), 1),
            "all": [round(p, 1) for p in paints],
            "target_ms": 1000,
        },
        "search_applied_ms": {
            "median": round(statistics.median(search_ms), 1),
            "max": round(max(search_ms), 1),
            "target_ms": 300,
            "includes_typing_debounce_ms": 120,
        },
        "page_weight": {
            "transferred_bytes": total_bytes,
            "resources": [
                {
                    "url": w["name"].replace(url, ""),
                    "bytes": w["bytes"],
                    "body": w["body"],
                    # How long it took, and when it ended after navigation start.
                    "ms": w["ms"],
                    "ended_at_ms": w["end"],
                }
                for w in weight
            ],
        },
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studios", type=int, default=1000)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--searches", type=int, default=10)
    args = parser.parse_args()
    ok, why = browser_available()
    if not ok:
        print(json.dumps({"error": why}))
        sys.exit(1)
    with tempfile.TemporaryDirectory() as tmp:
        async with LocalStack(Path(tmp) / "stack", agent_args=("--volume-kind", "directory")) as s:
            seconds = await _add_studios(s, args.studios)
            result = await _measure(s, args.loads, args.searches)
    print(
        json.dumps(
            {"studios": args.studios, "add_studios_seconds": round(seconds, 1), **result},
            indent=2,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
