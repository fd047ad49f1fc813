"""Reading a studio back through the API, for the controller's lifecycle tests."""

from __future__ import annotations

from typing import Any

from controller.deadlines import DeadlineSettings
from tests.conftest import ControllerHarness


def deadline_settings(h: ControllerHarness) -> DeadlineSettings:
    """The running controller's deadline settings, which a test may shorten in place."""
    assert h.controller is not None and h.controller.reconciler is not None
    deadlines = h.controller.reconciler.deadlines
    assert deadlines is not None
    return deadlines.settings


async def studio(h: ControllerHarness, sid: str) -> dict[str, Any]:
    """`GET /studios/{sid}`."""
    _, body = await h.request("GET", f"/studios/{sid}", expect=200)
    assert isinstance(body, dict)
    return body


async def until_status(
    h: ControllerHarness, sid: str, status: str, timeout: int = 15
) -> dict[str, Any]:
    """The studio once it has `status` (the `?wait=` long-poll); fails if it has not."""
    _, body = await h.request("GET", f"/studios/{sid}?wait={status}&timeout={timeout}", expect=200)
    assert body["statusInfo"]["status"] == status, body["statusInfo"]
    return dict(body)
