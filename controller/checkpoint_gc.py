"""Garbage collection of checkpoint data, in the background.

Every compute environment writes its checkpoints to one store,
`<workDir>/.studios/checkpoints` (environments with the same workDir share it). A
collection of a store:

1. decides which checkpoint manifests are dead, from the catalogue:
   - every manifest of a *deleted* studio, unless a live studio still needs it (a
     clone's parent checkpoint, or the checkpoint a start restores);
   - a live studio's superseded refreshes: each run keeps one catalogue row whose
     URI is the run's newest manifest, so older interim manifests of the run are not
     in the catalogue; they are dead once older than `superseded_grace_s` (an event
     the controller has not received yet is never older than that);
   - manifests of sessions the catalogue does not know are kept (another controller,
     or a studio created before its first event arrived);
2. deletes those manifests;
3. runs `agent.checkpoints.gc.gc` with every remaining manifest live. Packs that no live
   manifest names are deleted (after the engine's grace period, and never while a
   backup holds its lock). Clones reference their parent's data by content, so the
   parent's packs stay as long as a clone's manifests do.

Runs are triggered when a studio is deleted (noticed within `poll_s`) and every
`interval_s`; a failed run is retried with exponential backoff. Every run is recorded
in `checkpoint_gc_runs`, and `GET /compute-envs` shows the last one as `checkpointGc`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from agent.checkpoints.content_store import storage_options_for
from agent.checkpoints.engine import get_repository
from agent.checkpoints.gc import DEFAULT_GRACE_S, gc
from agent.checkpoints.repo import Repository, manifest_name, split_checkpoint_uri
from agent.errors import CheckpointError
from controller.db import Database
from controller.leader import Leader, run_once_across_controllers
from controller.models import Checkpoint, CheckpointGcRun, ComputeEnv, Studio, as_utc, utcnow
from controller.periodic import PeriodicPass
from controller.stores import checkpoint_base_uri

__all__ = ["CheckpointGc", "StorePlan", "last_gc_runs"]

log = logging.getLogger(__name__)


@dataclass
class StorePlan:
    """What the catalogue says about one store."""

    base_uri: str
    compute_env_ids: list[str]
    live_sessions: set[str] = field(default_factory=set)
    deleted_sessions: set[str] = field(default_factory=set)
    # Catalogue checkpoints per session, as manifest names (the newest of each run).
    names: dict[str, set[str]] = field(default_factory=dict)
    # Manifests a live studio needs whoever owns them (restore points, clone parents).
    pinned: set[str] = field(default_factory=set)
    # Newest deletion of a studio of this store.
    last_deleted: datetime | None = None


def _manifest_name(uri: str) -> str | None:
    try:
        _, session_id, key = split_checkpoint_uri(uri)
    except CheckpointError:
        return None
    return manifest_name(session_id, key)


async def last_gc_runs(session: Any, compute_env_ids: list[str]) -> dict[str, CheckpointGcRun]:
    """The newest GC run of each compute env's store."""
    if not compute_env_ids:
        return {}
    envs = (
        await session.scalars(select(ComputeEnv).where(ComputeEnv.id.in_(compute_env_ids)))
    ).all()
    bases = {e.id: checkpoint_base_uri(e.work_dir) for e in envs}
    newest = (
        select(CheckpointGcRun.base_uri, func.max(CheckpointGcRun.id).label("id"))
        .where(CheckpointGcRun.base_uri.in_(set(bases.values())))
        .group_by(CheckpointGcRun.base_uri)
        .subquery()
    )
    runs = (
        await session.scalars(
            select(CheckpointGcRun).join(newest, CheckpointGcRun.id == newest.c.id)
        )
    ).all()
    by_base = {r.base_uri: r for r in runs}
    return {env_id: by_base[b] for env_id, b in bases.items() if b in by_base}


class CheckpointGc(PeriodicPass):
    name = "checkpoint GC pass"

    def __init__(
        self,
        db: Database,
        *,
        interval_s: float = 6 * 3600.0,
        poll_s: float = 10.0,
        grace_s: float = DEFAULT_GRACE_S,
        superseded_grace_s: float = 24 * 3600.0,
        attempts: int = 4,
        backoff_s: float = 2.0,
        s3_endpoint: str | None = None,
    ) -> None:
        # Woken every `poll_s` to see whether a store is due; `interval_s` is
        # how often each store is collected when nothing is deleted.
        super().__init__(poll_s)
        self.db = db
        self.interval_s = interval_s
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.superseded_grace_s = superseded_grace_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.s3_endpoint = s3_endpoint
        # Per store: when the last run finished (monotonic) and whether it succeeded.
        self._last_ok: dict[str, datetime] = {}
        self._next_try: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    # ------------------------------------------------------------ background task

    # Set by the controller: one collector across controllers (controller.leader).
    leader: Leader | None = None

    @run_once_across_controllers("checkpoint-gc")
    async def tick(self) -> None:
        await self.run_once()

    async def run_once(self, *, force: bool = False) -> list[CheckpointGcRun]:
        """Collect every store that needs it (all of them with `force`)."""
        now = time.monotonic()
        if not force:
            # The full catalogue (every studio and checkpoint) is read only when a store
            # is due: this check runs every `poll_s` and must stay cheap with 10,000s of
            # studios (one aggregate query instead of loading them all).
            due = {
                base
                for base, last_deleted in (await self.last_deletions()).items()
                if self._due(base, last_deleted, now)
            }
            if not due:
                return []
        runs = []
        for plan in await self.plans():
            if force or plan.base_uri in due:
                runs.append(await self.collect(plan))
        return runs

    def _due(self, base: str, last_deleted: datetime | None, now: float) -> bool:
        if now < self._next_try.get(base, 0.0):
            return False
        last = self._last_ok.get(base)
        if last is None:
            # First pass of this process: only when a studio has been deleted.
            return last_deleted is not None
        if last_deleted is not None and last_deleted > last:
            return True
        return (utcnow() - last).total_seconds() >= self.interval_s

    async def last_deletions(self) -> dict[str, datetime | None]:
        """{store: its newest studio deletion (None: none)}, for every store."""
        async with self.db.transaction() as session:
            envs = (await session.execute(select(ComputeEnv.id, ComputeEnv.work_dir))).all()
            newest = dict(
                (
                    await session.execute(
                        select(Studio.compute_env_id, func.max(Studio.date_deleted))
                        .where(Studio.deleted.is_(True))
                        .group_by(Studio.compute_env_id)
                    )
                ).all()
            )
        by_base: dict[str, datetime | None] = {}
        for env_id, work_dir in envs:
            base = checkpoint_base_uri(work_dir)
            deleted = as_utc(newest.get(env_id))
            known = by_base.get(base)
            by_base[base] = deleted if known is None or (deleted and deleted > known) else known
        return by_base

    # ------------------------------------------------------------ the catalogue

    async def plans(self) -> list[StorePlan]:
        async with self.db.transaction() as session:
            envs = (await session.scalars(select(ComputeEnv))).all()
            by_base: dict[str, StorePlan] = {}
            env_base: dict[str, str] = {}
            for env in envs:
                base = checkpoint_base_uri(env.work_dir)
                env_base[env.id] = base
                plan = by_base.setdefault(base, StorePlan(base, []))
                plan.compute_env_ids.append(env.id)
            studios = (await session.scalars(select(Studio))).all()
            sid_base: dict[str, str] = {}
            needed_ids: set[int] = set()
            for st in studios:
                studio_base = env_base.get(st.compute_env_id)
                if studio_base is None:
                    continue
                plan = by_base[studio_base]
                sid_base[st.session_id] = studio_base
                if st.deleted:
                    plan.deleted_sessions.add(st.session_id)
                    deleted = as_utc(st.date_deleted)
                    if deleted is not None and (
                        plan.last_deleted is None or deleted > plan.last_deleted
                    ):
                        plan.last_deleted = deleted
                else:
                    plan.live_sessions.add(st.session_id)
                    for attr in ("restore_checkpoint_id", "parent_checkpoint_id"):
                        if (cid := getattr(st, attr, None)) is not None:
                            needed_ids.add(cid)
            for cp in (await session.scalars(select(Checkpoint))).all():
                name = _manifest_name(cp.uri)
                if name is None:
                    continue  # an archive of the first format: not the engine's
                cp_base = sid_base.get(cp.session_id)
                if cp_base is not None:
                    by_base[cp_base].names.setdefault(cp.session_id, set()).add(name)
                if cp.id in needed_ids:
                    # Names are unique per store; a clone may sit in another store.
                    for plan in by_base.values():
                        plan.pinned.add(name)
        return list(by_base.values())

    def dead_manifests(self, plan: StorePlan, repo: Repository, now: float) -> list[str]:
        """Names (`manifests/<session>/<key>`) of the manifests to delete; blocking."""
        dead = []
        for info in repo.list_checkpoints():
            sid = info.session_id
            name = repo.manifest_name(sid, info.key)
            if name in plan.pinned:
                continue
            if sid in plan.deleted_sessions and sid not in plan.live_sessions:
                dead.append(name)
            elif sid in plan.live_sessions:
                age = now - info.saved_at if info.saved_at else 0.0
                if name not in plan.names.get(sid, set()) and age > self.superseded_grace_s:
                    dead.append(name)
        return dead

    # ------------------------------------------------------------ one collection

    async def collect(self, plan: StorePlan) -> CheckpointGcRun:
        base = plan.base_uri
        run = CheckpointGcRun(
            base_uri=base,
            compute_env_id=plan.compute_env_ids[0] if plan.compute_env_ids else "",
            started_at=utcnow(),
            ok=False,
            attempts=0,
            deleted_manifests=0,
            deleted_packs=0,
            freed_bytes=0,
            failed=[],
        )
        opts = storage_options_for(base, self.s3_endpoint)
        error = ""
        removed: set[str] = set()
        for attempt in range(1, self.attempts + 1):
            run.attempts = attempt
            try:
                removed |= await self._collect_once(plan, opts, run)
                error = ""
                break
            except Exception as e:
                error = f"{type(e).__name__}: {e}" if not isinstance(e, CheckpointError) else str(e)
                log.warning(
                    "checkpoint GC of %s failed (attempt %d of %d): %s",
                    base,
                    attempt,
                    self.attempts,
                    error,
                )
                if attempt < self.attempts:
                    await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
        run.finished_at = utcnow()
        if error:
            run.ok = False
            run.message = f"gave up after {run.attempts} attempts: {error}"
            n = self._failures[base] = self._failures.get(base, 0) + 1
            self._next_try[base] = time.monotonic() + min(
                self.interval_s, self.backoff_s * 30 * 2 ** (n - 1)
            )
            log.error("checkpoint GC of %s: %s", base, run.message)
        else:
            run.ok = not run.failed
            self._failures.pop(base, None)
            self._next_try.pop(base, None)
            self._last_ok[base] = run.started_at
            log.info(
                "checkpoint GC of %s: %d manifests and %d packs deleted, %d bytes freed%s",
                base,
                run.deleted_manifests,
                run.deleted_packs,
                run.freed_bytes,
                f"; {len(run.failed)} deletions failed" if run.failed else "",
            )
        async with self.db.transaction() as session:
            session.add(run)
            if removed and plan.deleted_sessions:
                # Deleted studios' checkpoints whose data is gone: no longer restorable.
                rows = await session.scalars(
                    select(Checkpoint).where(Checkpoint.session_id.in_(plan.deleted_sessions))
                )
                for cp in rows:
                    if _manifest_name(cp.uri) in removed:
                        cp.status = "invalid"
        return run

    async def _collect_once(
        self, plan: StorePlan, opts: dict[str, Any] | None, run: CheckpointGcRun
    ) -> set[str]:
        """One attempt; the manifest names it deleted."""
        base = plan.base_uri
        try:
            repo = await asyncio.to_thread(get_repository, base, opts, create=False)
        except CheckpointError as e:
            if "no checkpoint repository" in str(e):
                run.message = "no checkpoint repository yet"
                return set()
            raise
        dead = await asyncio.to_thread(self.dead_manifests, plan, repo, time.time())
        failed: list[list[str]] = []
        removed: set[str] = set()
        for name in dead:
            try:
                await asyncio.to_thread(repo.backend.remove, name)
            except FileNotFoundError:
                pass
            except Exception as e:
                failed.append([name, str(e)])
                continue
            run.deleted_manifests += 1
            removed.add(name)
        # Everything still present is live: a manifest written meanwhile is safe.
        report = await gc(base, None, grace_s=self.grace_s, storage_options=opts)
        run.deleted_packs += len(report.deleted_packs)
        run.freed_bytes += report.freed_bytes
        failed.extend([name, err] for name, err in report.failed)
        run.failed = failed
        if report.skipped:
            run.message = report.skipped
        return removed
