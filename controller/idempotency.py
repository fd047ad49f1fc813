"""`Idempotency-Key` on `POST /studios` and `PUT /studios/{sessionId}/start` (an addition).

A request sent with a key (same user, same workspace, same operation) within
`KEY_LIFETIME` of the first gets the first one's answer, status and body, and nothing is
done again; the same key with another body is refused (422, saying so). The first
request claims the key by inserting its row before it does anything: the primary key
(user, workspace, operation, key) decides between concurrent copies, never a check
followed by an insert, so two copies never both run. A copy that arrives while the first
is still being carried out waits for its answer (up to `WAIT_FOR_FIRST`), then gets a
409. A first request that fails with a client error (4xx) has its answer kept like any
other; one that fails with a server error releases the key, so a retry runs again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from aiohttp import web
from sqlalchemy import Select, delete, select
from sqlalchemy.exc import IntegrityError

from controller.db import Database
from controller.errors import BadRequest, Conflict, StudiosError
from controller.models import IdempotencyKey, as_utc, utcnow

__all__ = ["HEADER", "KEY_LIFETIME", "Idempotency", "IdempotencyMismatch"]

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
KEY_LIFETIME = timedelta(hours=24)
# How long a copy waits for the first request's answer.
WAIT_FOR_FIRST = 30.0
_MAX_KEY = 255


class IdempotencyMismatch(StudiosError):
    status = 422


def request_hash(body: bytes, query: str = "") -> str:
    """sha256 of the query and the body as JSON in canonical form (keys sorted, no
    spacing), so that the same request re-serialised by a client's retry matches; the
    raw bytes when the body is not JSON."""
    try:
        canonical = json.dumps(
            json.loads(body) if body.strip() else None, sort_keys=True, separators=(",", ":")
        ).encode()
    except ValueError:
        canonical = body
    return hashlib.sha256(query.encode() + b"\n" + canonical).hexdigest()


def header_key(request: web.Request) -> str | None:
    """The request's key, or None; 400 when it is empty or too long."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > _MAX_KEY or not key.isprintable():
        raise BadRequest(f"{HEADER}: 1 to {_MAX_KEY} printable characters")
    return key


class Idempotency:
    def __init__(self, db: Database, *, poll_interval: float = 0.05) -> None:
        self.db = db
        self.poll_interval = poll_interval

    async def run(
        self,
        *,
        user_id: int,
        workspace_id: int,
        operation: str,
        key: str,
        body: bytes,
        query: str = "",
        handler: Callable[[], Awaitable[web.Response]],
    ) -> web.Response:
        """The answer of the first request with this key (running `handler` only then)."""
        digest = request_hash(body, query)
        ident = (user_id, workspace_id, operation, key)
        claimed = await self._claim(ident, digest)
        if not claimed:
            return await self._replay(ident, digest)
        try:
            response = await handler()
        except StudiosError as exc:
            if exc.status >= 500:
                await self._release(ident)
                raise
            await self._store(ident, exc.status, json.dumps({"message": str(exc)}))
            raise
        except BaseException:
            await self._release(ident)
            raise
        text = response.text if isinstance(response, web.Response) else None
        await self._store(ident, response.status, text)
        return response

    async def _claim(self, ident: tuple[int, int, str, str], digest: str) -> bool:
        user_id, workspace_id, operation, key = ident
        now = utcnow()
        try:
            async with self.db.transaction() as session:
                # An expired key is free again: removed in the claim's own transaction.
                await session.execute(
                    delete(IdempotencyKey).where(
                        IdempotencyKey.user_id == user_id,
                        IdempotencyKey.workspace_id == workspace_id,
                        IdempotencyKey.operation == operation,
                        IdempotencyKey.key == key,
                        IdempotencyKey.created_at < now - KEY_LIFETIME,
                    )
                )
                session.add(
                    IdempotencyKey(
                        user_id=user_id,
                        workspace_id=workspace_id,
                        operation=operation,
                        key=key,
                        request_hash=digest,
                        created_at=now,
                    )
                )
        except IntegrityError:
            return False
        return True

    async def _replay(self, ident: tuple[int, int, str, str], digest: str) -> web.Response:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_FOR_FIRST
        while True:
            async with self.db.transaction() as session:
                row = await session.scalar(_by_ident(ident))
            if row is None:
                # Released by a first request that failed: this copy's turn.
                raise Conflict(
                    f"{HEADER} {ident[3]!r}: the first request with this key failed; send it again"
                )
            if row.request_hash != digest:
                raise IdempotencyMismatch(
                    f"{HEADER} {ident[3]!r} was used with a different request body "
                    f"(first at {_iso(row.created_at)}): use a new key for a new request"
                )
            if row.status is not None:
                log.info("idempotent replay of %s key %r", ident[2], ident[3])
                if row.body is None:
                    return web.Response(status=row.status)
                return web.Response(
                    status=row.status, text=row.body, content_type="application/json"
                )
            if loop.time() >= deadline:
                raise Conflict(
                    f"{HEADER} {ident[3]!r}: the first request with this key is still "
                    "being carried out; retry later"
                )
            await asyncio.sleep(self.poll_interval)

    async def _store(self, ident: tuple[int, int, str, str], status: int, body: str | None) -> None:
        async with self.db.transaction() as session:
            row = await session.scalar(_by_ident(ident).with_for_update())
            if row is not None:
                row.status, row.body = status, body

    async def _release(self, ident: tuple[int, int, str, str]) -> None:
        try:
            async with self.db.transaction() as session:
                row = await session.scalar(_by_ident(ident).with_for_update())
                if row is not None and row.status is None:
                    await session.delete(row)
        except Exception:
            log.exception("releasing %s key %r failed", ident[2], ident[3])

    async def purge(self) -> int:
        """Delete keys older than their lifetime; how many."""
        async with self.db.transaction() as session:
            result = await session.execute(
                delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - KEY_LIFETIME)
            )
        return int(getattr(result, "rowcount", 0) or 0)


def _by_ident(ident: tuple[int, int, str, str]) -> Select[IdempotencyKey]:
    user_id, workspace_id, operation, key = ident
    return select(IdempotencyKey).where(
        IdempotencyKey.user_id == user_id,
        IdempotencyKey.workspace_id == workspace_id,
        IdempotencyKey.operation == operation,
        IdempotencyKey.key == key,
    )


def _iso(when: object) -> str:
    if isinstance(when, datetime):
        utc = as_utc(when)
        if utc is not None:
            return utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    return "an earlier time"
