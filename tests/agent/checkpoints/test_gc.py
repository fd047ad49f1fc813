"""GC: mark from live checkpoints, sweep the rest; never what a running backup needs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.checkpoints import engine as E
from agent.checkpoints.gc import gc
from agent.errors import CheckpointError


def _tree(root: Path, **files: bytes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def _packs(repo: Path) -> set[str]:
    return {p.name for p in (repo / "data").rglob("*") if p.is_file()}


async def test_gc_deletes_only_unreferenced(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    uri = f"file://{repo}"
    shared = os.urandom(2 << 20)
    ra = await E.backup(uri, "a", _tree(tmp_path / "a", s=shared, x=os.urandom(2 << 20)))
    before_b = _packs(repo)
    rb = await E.backup(uri, "b", _tree(tmp_path / "b", s=shared, y=os.urandom(2 << 20)))
    only_b = _packs(repo) - before_b
    assert only_b

    # Studio b deleted: only a's checkpoint is live.
    rep = await gc(uri, [ra.uri], grace_s=0, delete_dead_manifests=True)
    assert not rep.failed and not rep.skipped
    assert set(rep.deleted_packs) == only_b
    assert rep.deleted_manifests == ["manifests/b/" + rb.key]
    assert _packs(repo) == before_b
    assert (await E.verify(ra.uri)).ok
    out = tmp_path / "out"
    await E.restore(ra.uri, out)
    assert (out / "s").read_bytes() == shared
    # A new backup after GC still works (the index no longer names deleted packs).
    rb2 = await E.backup(uri, "b", _tree(tmp_path / "b"))
    assert (await E.verify(rb2.uri)).ok
    # Nothing is unreferenced now: a second GC deletes nothing.
    rep2 = await gc(uri, grace_s=0)
    assert rep2.deleted_packs == [] and rep2.live_checkpoints == 2


async def test_gc_grace_period_keeps_young_packs(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    uri = f"file://{repo}"
    ra = await E.backup(uri, "a", _tree(tmp_path / "a", x=os.urandom(1 << 20)))
    # No live checkpoint at all, but the packs are younger than the grace period.
    rep = await gc(uri, [], grace_s=3600)
    assert rep.deleted_packs == []
    assert (await E.verify(ra.uri)).ok


async def test_gc_stays_out_of_a_running_backup(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    uri = f"file://{repo}"
    r_old = await E.backup(uri, "old", _tree(tmp_path / "old", x=os.urandom(1 << 20)))
    # A backup is running (its lock is there) and may be reusing those blobs right now.
    r = E.get_repository(uri)
    lock = r.take_lock("running")
    try:
        rep = await gc(uri, [], grace_s=0, delete_dead_manifests=True)
        assert rep.skipped and rep.deleted_packs == []
    finally:
        r.release_lock(lock)
    # The running backup reused the old data and wrote its manifest after the mark.
    r_new = await E.backup(uri, "new", tmp_path / "old")
    assert r_new.added_bytes < 64 * 1024
    rep = await gc(uri, [r_new.uri], grace_s=0)
    assert rep.deleted_packs == []
    assert (await E.verify(r_new.uri)).ok
    assert r_old.uri != r_new.uri


async def test_gc_interrupted_backup_garbage(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    uri = f"file://{repo}"
    rk = await E.backup(uri, "keep", _tree(tmp_path / "k", k=os.urandom(1 << 20)))
    before = _packs(repo)
    # Packs and index of a backup that never wrote its manifest are garbage.
    r = E.get_repository(uri)
    real = r.backend.save

    def die(name: str, data: bytes, *, overwrite: bool = False) -> None:
        if name.startswith("manifests/"):
            raise OSError("killed")
        real(name, data, overwrite=overwrite)

    r.backend.save = die  # type: ignore[method-assign]
    try:
        with pytest.raises(CheckpointError, match="killed"):
            await E.backup(uri, "dead", _tree(tmp_path / "d", d=os.urandom(1 << 20)))
    finally:
        r.backend.save = real  # type: ignore[method-assign]
    assert _packs(repo) > before
    rep = await gc(uri, grace_s=0)
    assert _packs(repo) == before and rep.deleted_packs
    assert (await E.verify(rk.uri)).ok
