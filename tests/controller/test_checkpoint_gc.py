"""Checkpoint GC in the controller: deleted studios' data goes, live and shared data stays."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from agent.checkpoints import engine as E
from controller.bootstrap import bootstrap
from controller.checkpoint_gc import CheckpointGc, last_gc_runs
from controller.db import Database
from controller.models import Checkpoint, CheckpointGcRun, ComputeEnv, Studio, utcnow
from controller.stores import checkpoint_base_uri
from controller.views import gc_run_json
from tests import s3_server as _s3
from tests.conftest import ControllerHarness
from tests.s3_server import S3Server

s3_server = _s3.s3_server


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'gc.db'}")
    await database.migrate()
    (tmp_path / "data").mkdir()
    await bootstrap(database, tmp_path / "data")
    try:
        yield database
    finally:
        await database.close()


def _packs(repo: Path | str, opts: dict[str, Any] | None = None) -> set[str]:
    if isinstance(repo, Path):
        return {p.name for p in (repo / "data").rglob("*") if p.is_file()}
    return {o.name.rsplit("/", 1)[-1] for o in E.get_repository(repo, opts).backend.list("data/")}


def _tree(root: Path, **files: bytes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


async def _env(db: Database, env_id: str, work_dir: str) -> None:
    async with db.transaction() as s:
        s.add(
            ComputeEnv(
                id=env_id, workspace_id=1, name=env_id, platform="studio-agent", work_dir=work_dir
            )
        )


async def _studio(
    db: Database, sid: str, env_id: str, uris: list[str], restore_of: int | None = None
) -> list[int]:
    async with db.transaction() as s:
        s.add(
            Studio(
                session_id=sid,
                workspace_id=1,
                user_id=1,
                name=f"studio {sid}",
                template_repository="t",
                tool="t",
                compute_env_id=env_id,
                status="stopped",
                restore_checkpoint_id=restore_of,
            )
        )
        await s.flush()
        rows = []
        for n, uri in enumerate(uris, 1):
            cp = Checkpoint(
                session_id=sid,
                name=f"{sid}_{n}",
                key=uri.rsplit("/", 1)[-1],
                uri=uri,
                status="finalized",
                generation=n,
            )
            s.add(cp)
            rows.append(cp)
        await s.flush()
        return [r.id for r in rows]


async def _delete(db: Database, sid: str) -> None:
    async with db.transaction() as s:
        st = await s.get(Studio, sid)
        assert st is not None
        st.deleted, st.date_deleted, st.desired_status = True, utcnow(), "deleted"


@pytest.mark.parametrize("backend", ["file", "s3"])
async def test_delete_frees_unique_packs_and_keeps_shared_ones(
    db: Database, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    opts = None
    if backend == "file":
        work: Path | str = tmp_path / "work"
        repo: Path | str = tmp_path / "work" / ".studios" / "checkpoints"
        base = f"file://{repo}"
    else:
        srv: S3Server = request.getfixturevalue("s3_server")
        mp: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        mp.setenv("AWS_ACCESS_KEY_ID", srv.key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", srv.secret)
        mp.setenv("STUDIOS_S3_ENDPOINT", srv.endpoint)
        bucket = srv.make_bucket(f"gc-{os.urandom(4).hex()}")
        work = f"s3://{bucket}/work"
        base = repo = f"{work}/.studios/checkpoints"
        opts = srv.storage_options
    await _env(db, "e" * 16, str(work))
    shared = os.urandom(2 << 20)
    ra = await E.backup(
        base,
        "aaaa0001",
        _tree(tmp_path / "a", s=shared, x=os.urandom(1 << 20)),
        storage_options=opts,
    )
    packs_a = _packs(repo, opts)
    rb = await E.backup(
        base,
        "bbbb0001",
        _tree(tmp_path / "b", s=shared, y=os.urandom(1 << 20)),
        storage_options=opts,
    )
    only_b = _packs(repo, opts) - packs_a
    assert only_b
    # A clone of d (not started yet) still needs d's checkpoint after d is deleted.
    rd = await E.backup(
        base, "dddd0001", _tree(tmp_path / "d", z=os.urandom(1 << 20)), storage_options=opts
    )
    packs_d = _packs(repo, opts) - packs_a - only_b
    await _studio(db, "aaaa0001", "e" * 16, [ra.uri])
    await _studio(db, "bbbb0001", "e" * 16, [rb.uri])
    [d_id] = await _studio(db, "dddd0001", "e" * 16, [rd.uri])
    await _studio(db, "cccc0001", "e" * 16, [], restore_of=d_id)

    gc = CheckpointGc(db, grace_s=0, backoff_s=0.01)
    assert await gc.run_once() == [], "nothing deleted yet: no work"
    await _delete(db, "bbbb0001")
    await _delete(db, "dddd0001")
    [run] = await gc.run_once()
    assert run.ok and run.attempts == 1 and not run.failed
    assert run.deleted_manifests == 1 and run.deleted_packs == len(only_b)
    assert _packs(repo, opts) == packs_a | packs_d
    assert E.list_checkpoints(base, "bbbb0001", storage_options=opts) == []
    assert (await E.verify(ra.uri, storage_options=opts)).ok
    assert (await E.verify(rd.uri, storage_options=opts)).ok
    out = tmp_path / "out"
    await E.restore(ra.uri, out, storage_options=opts)
    assert (out / "s").read_bytes() == shared
    # The deleted studio's checkpoint is no longer restorable; the pinned one is.
    async with db.transaction() as s:
        status = {c.session_id: c.status for c in (await s.scalars(select(Checkpoint))).all()}
    assert status == {"aaaa0001": "finalized", "bbbb0001": "invalid", "dddd0001": "finalized"}
    # Done: no new deletion, no new run until the interval.
    assert await gc.run_once() == []

    # The run is recorded and shown per compute env.
    async with db.transaction() as s:
        runs = await last_gc_runs(s, ["e" * 16])
    shown = gc_run_json(runs["e" * 16])
    assert shown["ok"] and shown["deletedPacks"] == len(only_b)
    assert shown["baseUri"] == f"{work}/.studios/checkpoints"
    assert len(packs_a) >= 1 and packs_a & _packs(repo, opts) == packs_a


async def test_superseded_refreshes_of_a_live_studio(db: Database, tmp_path: Path) -> None:
    work = tmp_path / "work"
    repo = work / ".studios" / "checkpoints"
    base = f"file://{repo}"
    await _env(db, "f" * 16, str(work))
    src = _tree(tmp_path / "s", tmp=os.urandom(1 << 20), keep=os.urandom(1 << 20))
    r1 = await E.backup(base, "eeee0001", src)
    (src / "tmp").unlink()
    r2 = await E.backup(base, "eeee0001", src, r1.uri)
    # One catalogue row per run, pointing at the newest refresh.
    await _studio(db, "eeee0001", "f" * 16, [r2.uri])
    young = CheckpointGc(db, grace_s=0)
    [run] = await young.run_once(force=True)
    assert run.ok and run.deleted_manifests == 0 and run.deleted_packs == 0
    assert (await E.verify(r1.uri)).ok
    old = CheckpointGc(db, grace_s=0, superseded_grace_s=0)
    [run] = await old.run_once(force=True)
    # (its packs are shared with the newest refresh here: small files share packs)
    assert run.ok and run.deleted_manifests == 1
    assert [c.uri for c in E.list_checkpoints(base, "eeee0001")] == [r2.uri]
    assert (await E.verify(r2.uri)).ok


async def test_store_down_is_retried_and_recorded(db: Database, tmp_path: Path) -> None:
    await _env(db, "1" * 16, "nosuchscheme://bucket/work")
    await _studio(db, "abcd0001", "1" * 16, [])
    await _delete(db, "abcd0001")
    gc = CheckpointGc(db, grace_s=0, attempts=3, backoff_s=0.01)
    [run] = await gc.run_once()
    assert not run.ok and run.attempts == 3
    assert "nosuchscheme://bucket/work/.studios/checkpoints" in (run.message or "")
    # Backoff: not tried again at once.
    assert await gc.run_once() == []
    async with db.transaction() as s:
        rows = (await s.scalars(select(CheckpointGcRun))).all()
    assert len(rows) == 1 and not rows[0].ok


async def test_compute_envs_show_the_last_gc(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    _, body = await h.request("GET", "/compute-envs", expect=200)
    [env] = body["computeEnvs"]
    # Absent before the first run (never null: issue 14).
    assert "checkpointGc" not in env
    assert h.controller is not None and h.controller.checkpoint_gc is not None
    await h.controller.checkpoint_gc.run_once(force=True)
    _, body = await h.request("GET", "/compute-envs", expect=200)
    gc = body["computeEnvs"][0]["checkpointGc"]
    assert gc is not None and gc["baseUri"] == "file:///tmp/work/.studios/checkpoints"


async def test_due_check_reads_the_catalogue_only_when_a_store_is_due(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check every poll is one aggregate query; the full catalogue (every studio and
    checkpoint) is read only for a pass that collects."""
    await _env(db, "e" * 16, str(tmp_path / "work"))
    await _env(db, "f" * 16, str(tmp_path / "other"))
    await _studio(db, "aaaa0001", "e" * 16, [])
    await _studio(db, "bbbb0001", "f" * 16, [])
    gc = CheckpointGc(db)
    catalogue_reads = 0
    plans = gc.plans

    async def counted() -> Any:
        nonlocal catalogue_reads
        catalogue_reads += 1
        return await plans()

    monkeypatch.setattr(gc, "plans", counted)
    assert await gc.run_once() == [] and catalogue_reads == 0  # nothing deleted yet

    await _delete(db, "aaaa0001")
    work_base = checkpoint_base_uri(str(tmp_path / "work"))
    deletions = await gc.last_deletions()
    assert deletions[work_base] is not None
    assert deletions[checkpoint_base_uri(str(tmp_path / "other"))] is None
    runs = await gc.run_once()
    # Only the store with the deletion is collected; the other is not due.
    assert [r.base_uri for r in runs] == [work_base] and catalogue_reads == 1
    assert await gc.run_once() == [] and catalogue_reads == 1  # collected since
