"""An API token's `lastUsed` is kept to the minute: a read request does not write it
each time (that made every GET a write transaction), yet it moves once it is stale."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select

from controller.auth import LAST_USED_PRECISION, hash_token
from controller.models import ApiToken, as_utc, utcnow
from tests.conftest import ControllerHarness


async def _last_used(h: ControllerHarness) -> datetime | None:
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        row = await session.scalar(
            select(ApiToken).where(ApiToken.token_hash == hash_token(h.admin_token))
        )
        assert row is not None
        return as_utc(row.last_used)


async def test_last_used_is_written_at_most_once_per_minute(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    await h.request("GET", "/studios", expect=200)
    first = await _last_used(h)
    assert first is not None
    for _ in range(3):
        await h.request("GET", "/studios", expect=200)
    assert await _last_used(h) == first  # within the minute: not rewritten

    # A minute later (the stored time moved back), the next request records the use.
    assert h.controller is not None and h.controller.db is not None
    async with h.controller.db.transaction() as session:
        row = await session.scalar(
            select(ApiToken).where(ApiToken.token_hash == hash_token(h.admin_token))
        )
        assert row is not None
        row.last_used = utcnow() - LAST_USED_PRECISION - timedelta(seconds=1)
    stale = await _last_used(h)
    await h.request("GET", "/studios", expect=200)
    now = await _last_used(h)
    assert now is not None and stale is not None
    assert now > stale and (utcnow() - now) < timedelta(seconds=30)
