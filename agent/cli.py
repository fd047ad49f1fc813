"""`studio-agent`: serve, and read a running agent through its admin socket.

`serve` reads its settings from a TOML file too (`--config`, by default
/etc/studios/agent.toml when it exists; keys are the flags without `--`, flags on the
command line override it: studios_shared.config_file). Misconfiguration (a port in use,
a state directory that cannot be created, an unreadable join token when the agent must
enroll, a bad config file) stops it with one line on stderr naming the setting and the
cause, `studio-agent: <setting>: <cause>`, and exit status 2 (as argparse's own usage
errors), never a traceback.

`drain [--wait] [--no-follow]` takes the host out of service through the running
agent's admin socket: no new session is placed on it; without `--wait` the controller
stops its running sessions (each saves its final checkpoint), with `--wait` they are
left to finish. It follows until no session is active on the host. `undrain` ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from agent import cli_checkpoint, cli_images
from agent.admin import AdminError, AgentNotRunning, admin_get, admin_post
from agent.cli_checkpoint import human_size
from agent.daemon import Agent, AgentConfig
from agent.errors import AgentError
from agent.host import doctor_report
from agent.sessions.context import normalised_absolute
from agent.state import StateDir
from studios_shared.config_file import (
    config_help,
    make_optional,
    read_serve_config,
    usage_error,
)
from studios_shared.log_format import LOG_FORMATS, configure_logging, resolve_log_format
from studios_shared.metrics_server import parse_metrics_address

__all__ = ["DEFAULT_CONFIG", "build_parser", "main"]

DEFAULT_CONFIG = Path("/etc/studios/agent.toml")
PROG = "studio-agent"
# `serve`'s options that must be given, on the command line or in the config file.
_REQUIRED = ("--controller", "--token-file", "--compute-env", "--state-dir")


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


def _proxy_workers(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise argparse.ArgumentTypeError(
            f"expected a number of processes from 1 to 64, got {value!r}"
        )
    return int(value)


def _host_path_prefix(value: str) -> str:
    if not normalised_absolute(value) or value == "/":
        raise argparse.ArgumentTypeError(
            f"expected an absolute, normalised directory other than /, got {value!r}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio-agent", description="Studios node agent")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the agent")
    serve.add_argument(
        "--config", type=Path, default=None, metavar="FILE", help=config_help(DEFAULT_CONFIG)
    )
    serve.add_argument(
        "--controller",
        required=True,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="the controller's enrollment endpoint; several controllers of one database "
        "comma-separated (the agent fails over to the next when one goes away), or a name "
        "that resolves to several addresses",
    )
    serve.add_argument("--token-file", required=True, type=Path)
    serve.add_argument("--compute-env", required=True, metavar="ID")
    serve.add_argument("--state-dir", required=True, type=Path)
    serve.add_argument("--runtime", default="local", help="runtime backend (local, podman)")
    serve.add_argument("--proxy", default=("127.0.0.1", 7070), type=_host_port, metavar="HOST:PORT")
    serve.add_argument("--proxy-domain", default="localhost")
    serve.add_argument(
        "--proxy-relay",
        default="copy",
        choices=("splice", "copy"),
        help="how the proxy relays the tools' bytes to browsers: copy (through Python, the "
        "default) or splice (os.splice in the kernel, Linux; copy elsewhere and over TLS)",
    )
    serve.add_argument(
        "--proxy-workers",
        default=1,
        type=_proxy_workers,
        metavar="N",
        help="connect proxy processes sharing the --proxy port (SO_REUSEPORT): the agent "
        "and N-1 worker processes of its own. Default 1. More processes hold more "
        "connections (a proxied WebSocket costs 2 descriptors of one process's nofile "
        "limit: 10,000 WebSockets need 2 or more under a limit of 20,000) and relay on "
        "more cores",
    )
    serve.add_argument("--local-templates", type=Path, metavar="FILE")
    serve.add_argument(
        "--local-tool-user",
        default="session",
        choices=("session", "agent"),
        help="who runs local tools: session (as root, a uid of its own per session) or "
        "agent (the agent's own user: no separation, development only)",
    )
    serve.add_argument("--stop-grace-seconds", type=float, default=30.0)
    serve.add_argument("--start-timeout-seconds", type=float, default=60.0)
    serve.add_argument(
        "--env-build-timeout-seconds",
        type=float,
        default=1800.0,
        help="the longest a studio's custom environment may take to build",
    )
    serve.add_argument(
        "--env-build-disk-gib",
        type=float,
        default=8.0,
        help="the most a custom environment's build may write to podman's storage",
    )
    serve.add_argument(
        "--conda-channel",
        action="append",
        default=[],
        metavar="URL",
        help="a conda channel custom environments may install from (repeatable; none: "
        "conda packages are refused, pip: and apt: lists still build)",
    )
    serve.add_argument(
        "--checkpoint-interval-seconds",
        type=float,
        default=300.0,
        help="refresh a running session's checkpoint this often (interim)",
    )
    serve.add_argument(
        "--s3-endpoint",
        default=None,
        metavar="URL",
        help="S3-compatible endpoint for s3:// checkpoint stores (or STUDIOS_S3_ENDPOINT)",
    )
    serve.add_argument(
        "--volume-kind",
        default="auto",
        choices=("auto", "xfs-loop", "directory"),
        help="session volumes (auto: xfs-loop where root and loop devices work)",
    )
    serve.add_argument(
        "--data-link-mounter",
        default="auto",
        choices=("auto", "s3fs", "rclone"),
        help="FUSE helper that mounts data-links (auto: s3fs-fuse, else rclone)",
    )
    serve.add_argument("--podman-socket", type=Path, default=Path("/run/podman/podman.sock"))
    serve.add_argument(
        "--podman-runtime", default="", metavar="NAME", help="OCI runtime for podman, e.g. runc"
    )
    serve.add_argument(
        "--container-ulimit",
        action="append",
        default=[],
        metavar="NAME=SOFT[:HARD]",
        help="container ulimit, repeatable (e.g. nofile=1024:1024)",
    )
    serve.add_argument(
        "--podman-network",
        default="bridge",
        choices=("bridge", "host"),
        help="each podman session's network: bridge (a network of its own: other sessions "
        "and the host's loopback unreachable) or host (UNSAFE: no isolation)",
    )
    serve.add_argument(
        "--allow-host-path",
        action="append",
        default=[],
        type=_host_path_prefix,
        metavar="PREFIX",
        help="host directory under which compute environments' fileSystemMounts may lie, "
        "repeatable (none by default: no file-system mount is made)",
    )
    serve.add_argument(
        "--metrics",
        default=None,
        metavar="[HOST:]PORT",
        help="serve Prometheus /metrics on a listener of its own (a bare PORT: on "
        "127.0.0.1); default: not served. Never on the --proxy port",
    )
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help="text (default) or json, one object per line (else STUDIOS_LOG_FORMAT)",
    )

    for name, text in (
        ("status", "the agent's identity, controller link and capacity"),
        ("sessions", "sessions on this host"),
        ("disk", "volume use per session"),
        ("doctor", "which runtimes and volume kinds are usable here"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--state-dir", required=True, type=Path)
        p.add_argument("--json", action="store_true", help="print JSON")
    drain = sub.add_parser(
        "drain",
        help="take this host out of service: no new sessions; running ones stopped with "
        "their final checkpoint (or left to finish with --wait)",
    )
    drain.add_argument("--state-dir", required=True, type=Path)
    drain.add_argument(
        "--wait",
        action="store_true",
        help="leave running sessions to finish instead of stopping them",
    )
    drain.add_argument(
        "--no-follow",
        action="store_true",
        help="return at once instead of following until no session is active",
    )
    undrain = sub.add_parser("undrain", help="end draining: sessions are placed here again")
    undrain.add_argument("--state-dir", required=True, type=Path)
    cli_checkpoint.add_parser(sub)
    cli_images.add_parser(sub)
    make_optional(serve)
    return parser


# S3 and HTTP clients log request headers at DEBUG: botocore's Authorization header
# names the access key id of a data-link (or of the checkpoint store).
CLIENT_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3fs", "fsspec", "urllib3", "aiohttp.client")


def quiet_client_loggers() -> None:
    """Keep the storage clients' loggers at INFO or above, whatever --log-level says:
    data-link keys never reach a log (docs/contract-notes.md "Which agent may say what")."""
    for name in CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def _serve(args: argparse.Namespace) -> int:
    try:
        log_format = resolve_log_format(args.log_format)
        metrics_host, metrics_port = (
            parse_metrics_address(args.metrics) if args.metrics else ("127.0.0.1", None)
        )
    except ValueError as exc:
        return usage_error(PROG, exc)
    configure_logging(args.log_level, log_format)
    quiet_client_loggers()
    proxy_host, proxy_port = args.proxy
    config = AgentConfig(
        controller=args.controller,
        token_file=args.token_file,
        compute_env=args.compute_env,
        state_dir=args.state_dir,
        runtime=args.runtime,
        proxy_host=proxy_host,
        proxy_port=proxy_port,
        proxy_domain=args.proxy_domain,
        proxy_relay=args.proxy_relay,
        proxy_workers=args.proxy_workers,
        local_templates=args.local_templates,
        local_tool_user=args.local_tool_user,
        stop_grace_seconds=args.stop_grace_seconds,
        start_timeout_seconds=args.start_timeout_seconds,
        env_build_timeout_seconds=args.env_build_timeout_seconds,
        env_build_disk_bytes=int(args.env_build_disk_gib * 2**30),
        conda_channels=tuple(args.conda_channel),
        volume_kind=args.volume_kind,
        data_link_mounter=args.data_link_mounter,
        podman_socket=args.podman_socket,
        podman_runtime=args.podman_runtime,
        container_ulimits=tuple(args.container_ulimit),
        podman_network=args.podman_network,
        checkpoint_interval_seconds=args.checkpoint_interval_seconds,
        s3_endpoint=args.s3_endpoint,
        allowed_host_paths=tuple(args.allow_host_path),
        metrics_host=metrics_host,
        metrics_port=metrics_port,
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Agent(config).serve(stop)

    try:
        # asyncio's loop, not uvloop: the agent spawns processes beside threads
        # (agent.proxy.loop says why); its proxy workers run on uvloop.
        asyncio.run(run())
    except (AgentError, OSError, ValueError) as exc:
        return usage_error(PROG, exc)
    return 0


def _certificate_text(ctl: dict[str, Any]) -> str:
    if ctl.get("revoked"):
        return f"revoked ({ctl['revoked']})"
    cert = ctl.get("certificate")
    if not cert:
        return "not enrolled yet"
    return f"valid until {cert['notAfter']}, renewed from {cert['renewAt']}"


def _print_status(data: dict[str, Any], console: Console) -> None:
    table = Table(show_header=False, box=None)
    ctl = data["controller"]
    link = "connected" if ctl["connected"] else "not connected"
    if ctl.get("lastError"):
        link += f" (last error: {ctl['lastError']})"
    cap = data["capacity"]
    sessions = data["sessions"]
    rows = [
        ("agent id", data["agentId"]),
        ("version", data["version"]),
        ("controller", f"{ctl['address']}: {link}"),
        ("certificate", _certificate_text(ctl)),
        ("compute env", data["computeEnv"]),
        ("runtime", data["runtime"]),
        ("proxy", data["proxyUrl"]),
        ("state dir", data["stateDir"]),
        (
            "sessions",
            ", ".join(f"{k} {v}" for k, v in sessions.items() if k != "total") or "none",
        ),
        ("cpus", str(cap["cpus"])),
        (
            "memory",
            f"{human_size(cap['memoryAvailableBytes'])} free of {human_size(cap['memoryBytes'])}",
        ),
        ("disk free", human_size(cap["diskFreeBytes"])),
        ("volume budget free", human_size(cap["diskBudgetFreeBytes"])),
    ]
    drain = data.get("drain") or {}
    if drain.get("draining"):
        rows.append(("draining", f"{drain['mode']}: no new sessions (`studio-agent undrain`)"))
    for item in data.get("reaped", [])[-5:]:
        rows.append(("reaped", f"{item['what']} of session {item['sessionId']}"))
    for k, v in rows:
        table.add_row(f"[bold]{k}[/bold]", v)
    console.print(table)


def _print_sessions(data: dict[str, Any], console: Console) -> None:
    table = Table(title="sessions")
    for col in ("id", "gen", "status", "runtime", "port", "volume", "size", "used"):
        table.add_column(col, no_wrap=True)
    # Paths are long: fold them rather than cut them, they are for copying.
    table.add_column("rootDir", overflow="fold")
    for s in data["sessions"]:
        vol = s.get("volume") or {}
        table.add_row(
            s["id"],
            str(s["generation"]),
            s["status"],
            s["runtime"],
            str(s["toolPort"] or "-"),
            vol.get("kind", "-"),
            human_size(vol.get("sizeBytes")),
            human_size(vol.get("usedBytes")),
            s["rootDir"],
        )
    console.print(table)
    for s in data["sessions"]:
        for dl in s.get("dataLinks") or []:
            where = dl.get("hostPath") or "-"
            note = f": {dl['message']}" if dl.get("message") else ""
            console.print(
                f"{s['id']}: /workspace/data/{dl['mountName']} {dl['state']} ({where}){note}",
                highlight=False,
            )
        if s["status"] == "errored" and s["message"]:
            console.print(f"[red]{s['id']}[/red]: {s['message']}", markup=True, highlight=False)


def _print_disk(data: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"volumes (budget free {human_size(data['budgetFreeBytes'])}"
        f" of {human_size(data['capBytes'])})"
    )
    for col in ("id", "status", "kind", "size", "used", "grown"):
        table.add_column(col, no_wrap=True)
    table.add_column("path", overflow="fold")
    for s in data["sessions"]:
        vol = s.get("volume") or {}
        growth = s.get("growth") or []
        table.add_row(
            s["id"],
            s["status"],
            vol.get("kind", "-"),
            human_size(vol.get("sizeBytes")),
            human_size(vol.get("usedBytes")),
            str(len(growth)),
            vol.get("path", "-"),
        )
    console.print(table)
    for s in data["sessions"]:
        for ev in s.get("growth") or []:
            console.print(
                f"{s['id']}: grown {human_size(ev['fromBytes'])} -> {human_size(ev['toBytes'])} "
                f"in {ev['seconds'] * 1000:.0f} ms",
                highlight=False,
            )
        if "disk budget" in (s.get("message") or "") or "cannot grow" in (s.get("message") or ""):
            console.print(f"[yellow]{s['id']}[/yellow]: {s['message']}", highlight=False)


def _print_doctor(data: dict[str, Any], console: Console) -> None:
    for title, key in (("runtimes", "runtimes"), ("volume kinds", "volumeKinds")):
        table = Table(title=title)
        for col in ("name", "usable", "in use", "why"):
            table.add_column(col)
        for entry in data[key]:
            table.add_row(
                entry["name"],
                "[green]yes[/green]" if entry["usable"] else "[red]no[/red]",
                "yes" if entry["inUse"] else "",
                entry["reason"],
            )
        console.print(table)
    links = data.get("dataLinks")
    if links:
        table = Table(title="data-link mounters")
        for col in ("name", "usable", "in use", "why"):
            table.add_column(col)
        for entry in links["mounters"]:
            table.add_row(
                entry["name"],
                "[green]yes[/green]" if entry["usable"] else "[red]no[/red]",
                "yes" if entry["inUse"] else "",
                entry["reason"],
            )
        console.print(table)
        state = "[green]usable[/green]" if links["fuseUsable"] else "[red]not usable[/red]"
        console.print(f"FUSE: {state}: {links['reason']}", highlight=False)


_PRINTERS = {
    "status": _print_status,
    "sessions": _print_sessions,
    "disk": _print_disk,
    "doctor": _print_doctor,
}


def _query(args: argparse.Namespace) -> int:
    socket_path = StateDir(args.state_dir).socket_path
    try:
        data = asyncio.run(admin_get(socket_path, args.command))
    except AgentNotRunning as exc:
        if args.command != "doctor":
            print(f"studio-agent: {exc}", file=sys.stderr)
            return 1
        # The host checks do not need the agent; say where the answer comes from.
        print(f"studio-agent: {exc}; checking from this process", file=sys.stderr)
        data = doctor_report(None)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        _PRINTERS[args.command](data, Console())
    return 0


def _drain(args: argparse.Namespace) -> int:
    socket_path = StateDir(args.state_dir).socket_path
    # soft_wrap: a line per event, never folded (its output is read by scripts too).
    console = Console(highlight=False, soft_wrap=True)
    try:
        if args.command == "undrain":
            asyncio.run(admin_post(socket_path, "undrain", {}))
            console.print("no longer draining: new sessions are placed on this host again")
            return 0
        mode = "wait" if args.wait else "stop"
        data = asyncio.run(admin_post(socket_path, "drain", {"mode": mode}))
    except (AgentNotRunning, AdminError) as exc:
        print(f"studio-agent: {exc}", file=sys.stderr)
        return 1
    console.print(
        "draining: no new sessions are placed on this host; "
        + (
            "running sessions are left to finish"
            if mode == "wait"
            else "the controller stops running sessions, each with its final checkpoint"
        )
    )
    if args.no_follow:
        active = len(data.get("activeSessions") or [])
        console.print(f"{active} session(s) active; `studio-agent status` shows the drain")
        return 0
    try:
        return asyncio.run(_follow_drain(socket_path, console))
    except KeyboardInterrupt:
        console.print("stopped following; the host is still draining (`studio-agent undrain`)")
        return 130


async def _follow_drain(socket_path: Path, console: Console, poll_seconds: float = 1.0) -> int:
    """Print each active session's status as it changes until none is active."""
    seen: dict[str, str] = {}
    with console.status("waiting for the sessions on this host to end") as status:
        while True:
            try:
                data = await admin_get(socket_path, "sessions")
                drain = (await admin_get(socket_path, "status")).get("drain") or {}
            except AgentNotRunning as exc:
                print(f"studio-agent: {exc}", file=sys.stderr)
                return 1
            if not drain.get("draining"):
                console.print("draining was ended (`studio-agent undrain`)")
                return 1
            active = {
                s["id"]: s["status"]
                for s in data["sessions"]
                if s["id"] in set(drain.get("activeSessions") or [])
            }
            for session_id, state in sorted(active.items()):
                if seen.get(session_id) != state:
                    console.print(f"session {session_id}: {state}")
            for session_id in sorted(set(seen) - set(active)):
                ended = next((s for s in data["sessions"] if s["id"] == session_id), None)
                console.print(f"session {session_id}: {ended['status'] if ended else 'removed'}")
            seen = active
            if not active:
                console.print("drained: no session is active on this host")
                return 0
            status.update(f"waiting for {len(active)} session(s) on this host to end")
            await asyncio.sleep(poll_seconds)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        failed = read_serve_config(
            PROG,
            parser,
            args,
            argv,
            explicit=args.config,
            default=DEFAULT_CONFIG,
            required=_REQUIRED,
        )
        return _serve(args) if failed is None else failed
    if args.command in ("drain", "undrain"):
        return _drain(args)
    if args.command == "checkpoint":
        return cli_checkpoint.run(args)
    if args.command == "images":
        return cli_images.run(args)
    return _query(args)


if __name__ == "__main__":
    sys.exit(main())
