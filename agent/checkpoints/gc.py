"""Garbage collection of checkpoint data: mark from live manifests, sweep the rest.

Safety against a backup running at the same time rests on three rules:
- a backup takes a lock object before it reads the indexes (`Repository.take_lock`);
- GC removes unreferenced packs from the indexes first, then checks the locks again,
  and only then deletes packs: a backup that started after that check can no longer
  find those packs, one that started before makes GC stop short of deleting;
- a pack younger than the grace period is never deleted, and manifests that appear
  after the mark are marked too.
Deleting is retried; anything that still fails is reported, and is garbage for next time.
Partial copies left by a save whose process was killed mid-write (local stores write to
a temporary name, then rename) are removed once they are older than any save can take.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.checkpoints.engine import get_repository
from agent.checkpoints.index import decode_index, encode_index
from agent.checkpoints.pack import PackEntry
from agent.checkpoints.repo import MANIFESTS, Repository, pack_name, split_checkpoint_uri

__all__ = ["GcReport", "gc", "gc_sync"]

DEFAULT_GRACE_S = 3600.0
# A lock older than this belongs to an agent that died mid-backup.
DEFAULT_LOCK_STALE_S = 6 * 3600.0
# A save writes its temporary copy in seconds; one untouched this long was abandoned.
DEFAULT_PARTIAL_STALE_S = 3600.0


@dataclass
class GcReport:
    live_checkpoints: int = 0
    live_packs: int = 0
    deleted_packs: list[str] = field(default_factory=list)
    deleted_indexes: list[str] = field(default_factory=list)
    deleted_manifests: list[str] = field(default_factory=list)
    # Partial copies of objects whose save was killed mid-write.
    deleted_partials: list[str] = field(default_factory=list)
    rewritten_indexes: int = 0
    freed_bytes: int = 0
    # (object name, error) for deletions that failed after retries.
    failed: list[tuple[str, str]] = field(default_factory=list)
    # Why packs were kept although unreferenced (a backup was running), if so.
    skipped: str = ""


def _manifest_names(repo: Repository) -> set[str]:
    return {o.name for o in repo.backend.list(MANIFESTS) if o.name.count("/") == 2}


def _packs_of(repo: Repository, names: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for name in names:
        _, session, key = name.split("/")
        try:
            out.update(repo.load_manifest(session, key).packs)
        except FileNotFoundError:
            continue
    return out


def _live_locks(repo: Repository, now: float, stale_s: float) -> list[str]:
    return [o.name for o in repo.backend.list("locks/") if o.mtime == 0 or now - o.mtime < stale_s]


def _remove(repo: Repository, name: str, report: GcReport) -> bool:
    try:
        repo.backend.remove(name)
        return True
    except FileNotFoundError:
        return True
    except Exception as e:
        report.failed.append((name, str(e)))
        return False


def _remove_partials(repo: Repository, now: float, stale_s: float, report: GcReport) -> None:
    for o in repo.backend.partial_writes(""):
        if o.mtime and now - o.mtime > stale_s and _remove(repo, o.name, report):
            report.deleted_partials.append(o.name)
            report.freed_bytes += o.size


def gc_sync(
    base_uri: str,
    live: Iterable[str] | None = None,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    lock_stale_s: float = DEFAULT_LOCK_STALE_S,
    partial_stale_s: float = DEFAULT_PARTIAL_STALE_S,
    delete_dead_manifests: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> GcReport:
    """Delete packs and indexes that no live checkpoint needs, and abandoned partial
    copies.

    `live`: the checkpoint URIs (or `manifests/<session>/<key>` names) still wanted;
    None means every manifest in the repository. With `delete_dead_manifests`, the
    other manifests are deleted first (the controller's catalogue is the authority)."""
    repo = get_repository(base_uri, storage_options)
    report = GcReport()
    # Whatever else GC may do: no save in progress has a copy this old, backup or not.
    _remove_partials(repo, time.time(), partial_stale_s, report)
    stale_s = lock_stale_s
    start = time.time()
    if locks := _live_locks(repo, start, stale_s):
        report.skipped = f"backup in progress ({locks[0]})"
        return report

    # Mark.
    present = _manifest_names(repo)
    if live is None:
        live_names = set(present)
    else:
        live_names = set()
        for item in live:
            if "://" in item or item.startswith("/"):
                _, session, key = split_checkpoint_uri(item)
                item = repo.manifest_name(session, key)
            live_names.add(item)
        live_names &= present
        if delete_dead_manifests:
            for name in sorted(present - live_names):
                if _remove(repo, name, report):
                    report.deleted_manifests.append(name)
    report.live_checkpoints = len(live_names)
    live_packs = _packs_of(repo, live_names)

    now = time.time()
    packs = {o.name.rsplit("/", 1)[-1]: o for o in repo.backend.list("data/")}
    dead = {
        p for p, o in packs.items() if p not in live_packs and o.mtime and now - o.mtime > grace_s
    }

    # Manifests written since the mark keep everything they name.
    later = _manifest_names(repo) - present
    dead -= _packs_of(repo, later)
    report.live_packs = len(packs) - len(dead)

    # Indexes first: once no index names a dead pack, no new backup can reuse it.
    for o in repo.backend.list("index/"):
        try:
            idx = decode_index(repo.backend.load(o.name))
        except FileNotFoundError:
            continue
        except Exception as e:
            report.failed.append((o.name, f"unreadable index: {e}"))
            continue
        idx_packs = {e.pack for e in idx.values()}
        gone = idx_packs & dead
        if not gone:
            continue
        keep = idx_packs - dead
        if keep:
            by_pack: dict[str, list[PackEntry]] = {}
            for b, ie in idx.items():
                if ie.pack in keep:
                    by_pack.setdefault(ie.pack, []).append(
                        PackEntry(b, ie.kind, ie.compressed, ie.offset, ie.length, ie.raw_length)
                    )
            iid, data = encode_index(by_pack)
            try:
                repo.backend.save(f"index/{iid}", data)
            except Exception as e:
                report.failed.append((f"index/{iid}", str(e)))
                # Without the replacement the old index must stay, and its packs too.
                dead -= idx_packs
                continue
            report.rewritten_indexes += 1
        if _remove(repo, o.name, report):
            report.deleted_indexes.append(o.name)
        else:
            dead -= idx_packs

    # A backup that took its lock after the first check may have read the old indexes.
    if locks := _live_locks(repo, time.time(), stale_s):
        report.skipped = f"backup started during GC ({locks[0]}); packs kept for next time"
        return report
    dead -= _packs_of(repo, _manifest_names(repo) - present - later)

    for p in sorted(dead):
        if _remove(repo, pack_name(p), report):
            report.deleted_packs.append(p)
            report.freed_bytes += packs[p].size
    return report


async def gc(
    base_uri: str,
    live: Iterable[str] | None = None,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    lock_stale_s: float = DEFAULT_LOCK_STALE_S,
    partial_stale_s: float = DEFAULT_PARTIAL_STALE_S,
    delete_dead_manifests: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> GcReport:
    return await asyncio.to_thread(
        gc_sync,
        base_uri,
        None if live is None else list(live),
        grace_s=grace_s,
        lock_stale_s=lock_stale_s,
        partial_stale_s=partial_stale_s,
        delete_dead_manifests=delete_dead_manifests,
        storage_options=storage_options,
    )
