"""`studio-agent checkpoint list|verify|restore`: operator tools that work on a store
directly (no running agent needed).

S3 stores take their keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and their
endpoint from `--s3-endpoint` or STUDIOS_S3_ENDPOINT, like the agent.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from agent.checkpoints.content_store import is_archive_uri, storage_options_for
from agent.checkpoints.engine import get_repository, restore_sync, verify_sync
from agent.checkpoints.repo import split_checkpoint_uri
from agent.errors import CheckpointError

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("checkpoint", help="list, verify and restore checkpoints in a store")
    csub = p.add_subparsers(dest="checkpoint_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--json", action="store_true", help="print JSON (no progress bars)")
        q.add_argument("--s3-endpoint", default=None, metavar="URL")

    ls = csub.add_parser("list", help="complete checkpoints in a store, oldest first")
    ls.add_argument("--store", required=True, metavar="URI", help="<workDir>/.studios/checkpoints")
    ls.add_argument("--session", default=None, metavar="ID")
    common(ls)

    ver = csub.add_parser("verify", help="download and re-hash everything a checkpoint needs")
    ver.add_argument("uri", metavar="URI")
    common(ver)

    res = csub.add_parser("restore", help="restore a checkpoint into an empty directory")
    res.add_argument("uri", metavar="URI")
    res.add_argument("--target", required=True, type=Path, metavar="DIR")
    common(res)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ts else ""


@contextmanager
def _bar(enabled: bool, what: str, unit_bytes: bool = True) -> Iterator[Callable[[int, int], None]]:
    if not enabled:
        yield lambda done, total: None
        return
    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn()]
    if unit_bytes:
        columns += [DownloadColumn(binary_units=True), TransferSpeedColumn()]
    else:
        columns += [MofNCompleteColumn(), TextColumn("packs")]
    columns.append(TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(what, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total or None)

        yield update


def _list(args: argparse.Namespace) -> int:
    opts = storage_options_for(args.store, args.s3_endpoint)
    repo = get_repository(args.store, opts, create=False)
    infos = repo.list_checkpoints(args.session)
    rows = []
    for info in infos:
        entry: dict[str, Any] = {
            "sessionId": info.session_id,
            "key": info.key,
            "uri": info.uri,
            "savedAt": _iso(info.saved_at),
        }
        try:
            m = repo.load_manifest(info.session_id, info.key)
            entry.update(
                files=m.stats.get("files"),
                bytes=m.stats.get("bytes"),
                storedBytes=m.stats.get("stored_bytes"),
                packs=len(m.packs),
                parent=m.parent,
            )
        except FileNotFoundError:
            continue  # deleted meanwhile
        rows.append(entry)
    if args.json:
        print(json.dumps({"store": args.store, "checkpoints": rows}, indent=2))
        return 0
    table = Table(title=f"checkpoints in {args.store}")
    for col in ("session", "key", "saved", "files", "size", "stored", "packs"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(
            r["sessionId"],
            r["key"],
            r["savedAt"],
            str(r.get("files", "")),
            human_size(r.get("bytes")),
            human_size(r.get("storedBytes")),
            str(r.get("packs", "")),
        )
    Console().print(table)
    return 0


def human_size(n: int | None) -> str:
    """Bytes for a person: "-" for unknown, else B, KiB ... TiB."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _base_of(uri: str) -> str:
    base, _, _ = split_checkpoint_uri(uri)
    return base


def _verify(args: argparse.Namespace) -> int:
    opts = storage_options_for(_base_of(args.uri), args.s3_endpoint)
    with _bar(not args.json, "verifying", unit_bytes=False) as bar:
        report = verify_sync(args.uri, storage_options=opts, progress=bar)
    out = {
        "uri": report.uri,
        "ok": report.ok,
        "problems": report.problems,
        "badPacks": report.bad_packs,
        "packsChecked": report.packs_checked,
        "bytesChecked": report.bytes_checked,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        console = Console()
        if report.ok:
            console.print(
                f"[green]ok[/green]: {report.packs_checked} packs, "
                f"{human_size(report.bytes_checked)} re-hashed",
                highlight=False,
            )
        else:
            console.print(f"[red]corrupt[/red]: {report.uri}", highlight=False)
            for problem in report.problems:
                console.print(f"  {problem}", highlight=False, markup=False)
    return 0 if report.ok else 1


def _restore(args: argparse.Namespace) -> int:
    target: Path = args.target
    if target.exists() and any(target.iterdir()):
        print(f"studio-agent: {target} is not empty", file=sys.stderr)
        return 2
    opts = storage_options_for(_base_of(args.uri), args.s3_endpoint)
    with _bar(not args.json, "restoring") as bar:
        result = restore_sync(args.uri, target, storage_options=opts, progress=bar)
    out = {
        "uri": args.uri,
        "target": str(target),
        "files": result.files,
        "bytes": result.bytes,
        "seconds": round(result.seconds, 3),
        "warnings": result.warnings,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        Console().print(
            f"restored {result.files} files ({human_size(result.bytes)}) into {target} "
            f"in {result.seconds:.1f} s",
            highlight=False,
        )
        for w in result.warnings:
            Console(stderr=True).print(f"warning: {w}", highlight=False, markup=False)
    return 0


def run(args: argparse.Namespace) -> int:
    uri = getattr(args, "uri", "") or ""
    if uri and is_archive_uri(uri):
        print(
            "studio-agent: archive (.tar.gz) checkpoints are plain tar files: use tar",
            file=sys.stderr,
        )
        return 2
    handler = {"list": _list, "verify": _verify, "restore": _restore}[args.checkpoint_command]
    try:
        return handler(args)
    except CheckpointError as exc:
        if args.json and args.checkpoint_command == "verify":
            print(json.dumps({"uri": uri, "ok": False, "problems": [str(exc)], "badPacks": []}))
            return 1
        print(f"studio-agent: {exc}", file=sys.stderr)
        return 1
