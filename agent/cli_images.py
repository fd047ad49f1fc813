"""`studio-agent images build [TEMPLATE ...]` and `studio-agent images list`: the studio
images of this host (agent/images), built from the definitions in the repository's
`images/` (or `--definitions DIR`) into the host's podman storage.

Progress goes to stderr (a line per image with its current step and last output line);
`--json` prints the results instead, without progress.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent.errors import AgentError
from agent.images.builder import BuildResult, build_images, image_states
from agent.images.definitions import (
    build_order,
    default_definitions_dir,
    load_definitions,
    resolve_names,
)

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("images", help="build and list the studio images of this host")
    isub = p.add_subparsers(dest="images_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--definitions",
            type=Path,
            default=None,
            metavar="DIR",
            help="the image definitions (default: $STUDIOS_IMAGES_DIR, else the repository's "
            "images/)",
        )
        q.add_argument("--json", action="store_true", help="print JSON (no progress)")

    build = isub.add_parser(
        "build",
        help="build images whose definition changed (all, or the named ones and what they "
        "are built FROM)",
    )
    build.add_argument(
        "templates",
        nargs="*",
        metavar="TEMPLATE",
        help="a definition name (jupyterlab), template (studios/jupyterlab:4.6-0.1) or "
        "image reference; none: every definition",
    )
    build.add_argument(
        "--force", action="store_true", help="rebuild the named images even when unchanged"
    )
    build.add_argument(
        "--log-dir", type=Path, default=None, metavar="DIR", help="full build logs (<name>.log)"
    )
    common(build)
    ls = isub.add_parser("list", help="the studio images this host has, and whether current")
    common(ls)


def _size(n: int | None) -> str:
    # Decimal units, as `podman images` shows them, so the two can be compared.
    if not n:
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return str(n)


def _build(args: argparse.Namespace) -> int:
    definitions = load_definitions(args.definitions or default_definitions_dir())
    names = resolve_names(definitions, args.templates) if args.templates else list(definitions)
    force = names if args.force else []
    err = Console(stderr=True)
    results: list[BuildResult]
    if args.json:
        results = build_images(definitions, names, force=force, log_dir=args.log_dir)
        print(json.dumps([r.as_json() for r in results], indent=2, sort_keys=True))
    elif not err.is_terminal:
        # A CI log or a pipe: a live display would show nothing until the end, so one
        # line per step of each image, with the time since the start.
        started = time.monotonic()

        def on_step(name: str, event: str, text: str) -> None:
            if event == "state":
                print(f"[{time.monotonic() - started:6.1f}s] {name}: {text}", file=sys.stderr)

        results = build_images(
            definitions, names, force=force, on_event=on_step, log_dir=args.log_dir
        )
        _print_results(results)
    else:
        columns = (
            SpinnerColumn(finished_text="[green]•[/]"),
            TextColumn("[bold]{task.fields[image]:<14}[/]"),
            TextColumn("{task.description}", markup=False),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=err, transient=False) as progress:
            tasks = {
                name: progress.add_task("waiting", image=name, start=False, total=1)
                for name in build_order(definitions, names)
            }
            state: dict[str, str] = {}

            def on_event(name: str, event: str, text: str) -> None:
                task = tasks[name]
                if event == "state":
                    state[name] = text
                    if text.startswith("building"):
                        progress.start_task(task)
                    elif not text.startswith("waiting"):
                        progress.update(task, completed=1)
                    progress.update(task, description=text)
                else:
                    # The step and the newest output line, cut to one terminal line.
                    line = text if len(text) <= 90 else text[:87] + "..."
                    progress.update(task, description=f"{state.get(name, '')}: {line}")

            results = build_images(
                definitions, names, force=force, on_event=on_event, log_dir=args.log_dir
            )
        _print_results(results)
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"studio-agent: {r.message}", file=sys.stderr)
        if r.log_path:
            print(f"studio-agent: full log: {r.log_path}", file=sys.stderr)
    return 1 if failed else 0


def _stdout() -> Console:
    # Not a terminal (a pipe, a CI log): wide enough for whole references, not 80 columns.
    console = Console()
    return console if console.is_terminal else Console(width=160)


def _print_results(results: list[BuildResult]) -> None:
    table = Table(title="studio images")
    for col in ("image", "reference", "result", "seconds", "size"):
        table.add_column(col, no_wrap=True)
    for r in results:
        seconds = f"{r.seconds:g}" if r.seconds else "-"
        table.add_row(r.name, r.reference, r.status, seconds, _size(r.size))
    _stdout().print(table)


def _list(args: argparse.Namespace) -> int:
    definitions = load_definitions(args.definitions or default_definitions_dir())
    rows = image_states(definitions)
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    table = Table(title="studio images on this host")
    for col in ("image", "reference", "template", "state", "id", "size", "created"):
        table.add_column(col, no_wrap=True)
    for row in rows:
        table.add_row(
            row.get("name", ""),
            row.get("reference", ""),
            row.get("template", ""),
            row["state"],
            row.get("imageId", "-"),
            _size(row.get("size")),
            str(row.get("created", ""))[:19],
        )
    _stdout().print(table)
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        if args.images_command == "build":
            return _build(args)
        return _list(args)
    except AgentError as exc:
        print(f"studio-agent: {exc}", file=sys.stderr)
        return 1
