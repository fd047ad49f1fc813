"""`studio-controller`: the command line.

    studio-controller serve --data-dir DIR [--http HOST:PORT] [--grpc HOST:PORT]
                            [--grpc-agents HOST:PORT] [--grpc-advertise NAME[,NAME...]]
                            [--grpc-agents-advertise HOST:PORT] [--agent-cert-lifetime 30d]
                            [--database URL] [--public-url URL] [--metrics [HOST:]PORT]
                            [--log-format text|json] [--secrets-key-file FILE]
    studio-controller user add --data-dir DIR --name NAME --email EMAIL
                               [--workspace ID] [--role ROLE] [--database URL]
    studio-controller agent token create --data-dir DIR [--compute-env ID] [--ttl 24h]
                                         [--uses N] [--name NAME] [--database URL]
    studio-controller agent list --data-dir DIR [--json] [--database URL]
    studio-controller agent revoke ID --data-dir DIR [--database URL]

`serve` reads its settings from a TOML file too (`--config FILE`, by default
/etc/studios/controller.toml when it exists): keys are the flags without `--`
(`data-dir = "/var/lib/studios"`), flags on the command line override the file
(studios_shared.config_file). Misconfiguration — a bad config file, a data directory
that cannot be created, a port in use, an unreadable templates or secrets key file, a
database that does not answer — stops it before anything starts with one line on
stderr, `studio-controller: <setting>: <cause>`, and exit status 2 (as argparse's usage
errors; controller.preflight), never a traceback.

`serve` logs to stderr (text, or one JSON object per line with `--log-format json` or
STUDIOS_LOG_FORMAT=json) and stops cleanly on SIGTERM and SIGINT. Under systemd
(`Type=notify`) it reports READY=1 once the database is migrated and HTTP and both
gRPC endpoints listen, pings the watchdog from its event loop, and STOPPING=1 on a
stop. `user add` prints the new user's API token on stdout, once; `agent token create`
a join token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from controller import enrollment
from controller.app import Controller
from controller.auth import Role, hash_token, new_token
from controller.bootstrap import bootstrap, ensure_data_dir
from controller.config import (
    DEFAULT_AGENT_CERT_LIFETIME_SECONDS,
    ControllerConfig,
    parse_duration,
    parse_host_port,
)
from controller.db import Database
from controller.errors import Conflict, NotFound, StudiosError
from controller.models import ApiToken, OrgMember, Participant, User, Workspace
from controller.preflight import Misconfigured, check_config
from controller.shared_secrets import load_controller_secrets, read_secrets_key
from studios_shared.config_file import (
    config_help,
    make_optional,
    read_serve_config,
    usage_error,
)
from studios_shared.log_format import LOG_FORMATS, configure_logging, resolve_log_format
from studios_shared.metrics_server import parse_metrics_address
from studios_shared.sd_notify import Notifier

__all__ = ["DEFAULT_CONFIG", "add_user", "main"]

log = logging.getLogger("controller")

DEFAULT_CONFIG = Path("/etc/studios/controller.toml")
PROG = "studio-controller"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio-controller", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the controller (REST + gRPC)")
    serve.add_argument(
        "--config", type=Path, default=None, metavar="FILE", help=config_help(DEFAULT_CONFIG)
    )
    serve.add_argument("--data-dir", required=True, type=Path)
    serve.add_argument("--http", default="127.0.0.1:8080", metavar="HOST:PORT")
    serve.add_argument(
        "--grpc",
        default="127.0.0.1:8081",
        metavar="HOST:PORT",
        help="the enrollment endpoint (TLS), what `studio-agent --controller` names",
    )
    serve.add_argument(
        "--grpc-agents",
        default="127.0.0.1:8082",
        metavar="HOST:PORT",
        help="the agent endpoint (mutual TLS with enrolled certificates); port 0: a free one",
    )
    serve.add_argument(
        "--grpc-advertise",
        default=None,
        metavar="NAME[,NAME...]",
        help="names (DNS or IP) of the controller's server certificate, as agents dial it "
        "(default: localhost, 127.0.0.1, ::1, the bind hosts, this host's names when binding "
        "every address)",
    )
    serve.add_argument(
        "--grpc-agents-advertise",
        default=None,
        metavar="HOST:PORT",
        help="where agents reach the agent endpoint (default: the host they enrolled at, "
        "the bound agents port)",
    )
    serve.add_argument(
        "--agent-cert-lifetime",
        default=str(int(DEFAULT_AGENT_CERT_LIFETIME_SECONDS)),
        metavar="DURATION",
        help="lifetime of agent certificates, seconds or e.g. 30d, 12h (default: 30 days)",
    )
    serve.add_argument("--database", default=None, metavar="URL")
    serve.add_argument("--public-url", default=None, metavar="URL")
    serve.add_argument(
        "--s3-endpoint",
        default=None,
        metavar="URL",
        help="S3-compatible endpoint of s3:// checkpoint stores (else STUDIOS_S3_ENDPOINT)",
    )
    serve.add_argument(
        "--checkpoint-gc-interval-seconds",
        type=float,
        default=6 * 3600.0,
        help="how often every checkpoint store is collected (default: 6 hours)",
    )
    serve.add_argument(
        "--checkpoint-gc-grace-seconds",
        type=float,
        default=3600.0,
        help="unreferenced checkpoint data younger than this is kept (default: 1 hour)",
    )
    serve.add_argument(
        "--templates",
        type=Path,
        default=None,
        metavar="FILE",
        help="the template catalogue, YAML (default: the packaged controller/templates.yaml)",
    )
    serve.add_argument(
        "--metrics",
        default=None,
        metavar="[HOST:]PORT",
        help="serve Prometheus /metrics on a listener of its own (a bare PORT: on "
        "127.0.0.1); default: not served. Never on the --http port: the figures are the "
        "operator's",
    )
    serve.add_argument(
        "--secrets-key-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="several controllers on one PostgreSQL: a 256-bit key (64 hex characters) "
        "every controller of the database is given; the agent CA and the connect, sign-in "
        "and credentials keys are sealed under it in the database and shared (default: this "
        "data directory's own secrets, for a single controller)",
    )
    serve.add_argument(
        "--resync-interval-seconds",
        type=float,
        default=60.0,
        help="how often every connected agent gets its full desired state again, the "
        "safety net under change notifications (0: never)",
    )
    serve.add_argument(
        "--reconcile-interval-seconds",
        type=float,
        default=5.0,
        help="how often pending starts are placed and lifespans checked",
    )
    serve.add_argument(
        "--agent-lease-seconds",
        type=float,
        default=30.0,
        help="an agent counts as connected this long after its controller last renewed its "
        "lease (several controllers)",
    )
    serve.add_argument(
        "--job-lease-seconds",
        type=float,
        default=15.0,
        help="how long a background job's lease lasts: how soon another controller takes "
        "over the job when its holder dies (several controllers)",
    )
    serve.add_argument(
        "--agent-lost-seconds",
        type=float,
        default=300.0,
        help="an agent with no stream and no heartbeat this long is lost: its active "
        "studios become errored ('agent lost') and can be deleted or started elsewhere",
    )
    serve.add_argument(
        "--starting-deadline-seconds",
        type=float,
        default=1800.0,
        help="a start (custom environment build, restore, tool answering) not running "
        "this long after it was asked for errors the studio, naming the step it was stuck in",
    )
    serve.add_argument(
        "--stopping-deadline-seconds",
        type=float,
        default=1800.0,
        help="a stop (final checkpoint included) not done this long after it began errors "
        "the studio, naming the step it was stuck in",
    )
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help="text (default) or json, one object per line (else STUDIOS_LOG_FORMAT)",
    )

    user = sub.add_parser("user", help="manage users")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    add = user_sub.add_parser("add", help="add a user and print a new API token for them")
    add.add_argument("--data-dir", required=True, type=Path)
    add.add_argument("--database", default=None, metavar="URL")
    add.add_argument("--name", required=True)
    add.add_argument("--email", required=True)
    add.add_argument("--workspace", type=int, default=1, metavar="ID")
    add.add_argument(
        "--role",
        default=Role.LAUNCH.value,
        choices=[r.value for r in Role],
        help="role in the workspace (default: launch, as in Seqera Platform)",
    )

    agent = sub.add_parser("agent", help="agent enrollment: join tokens, enrolled agents")
    agent_sub = agent.add_subparsers(dest="agent_command", required=True)
    token = agent_sub.add_parser("token", help="join tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="create a join token and print it once")
    create.add_argument("--data-dir", required=True, type=Path)
    create.add_argument("--database", default=None, metavar="URL")
    create.add_argument(
        "--compute-env",
        default=None,
        metavar="ID",
        help="bind the token to this compute environment (default: any of --workspace)",
    )
    create.add_argument("--workspace", type=int, default=1, metavar="ID")
    create.add_argument(
        "--ttl", default="24h", help="valid for this long (seconds or e.g. 24h, 7d; 0: forever)"
    )
    create.add_argument("--uses", type=int, default=None, metavar="N", help="at most N enrollments")
    create.add_argument("--name", default="cli", help="shown in logs and refusals")
    create.add_argument(
        "--secrets-key-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="the controllers' secrets key (as `serve` is given): the token pins their "
        "shared agent CA",
    )
    listing = agent_sub.add_parser("list", help="enrolled agents")
    listing.add_argument("--data-dir", required=True, type=Path)
    listing.add_argument("--database", default=None, metavar="URL")
    listing.add_argument("--json", action="store_true")
    revoke = agent_sub.add_parser(
        "revoke", help="revoke an agent for good; its active sessions become errored"
    )
    revoke.add_argument("agent_id", metavar="ID")
    revoke.add_argument("--data-dir", required=True, type=Path)
    revoke.add_argument("--database", default=None, metavar="URL")
    make_optional(serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        failed = read_serve_config(
            PROG,
            parser,
            args,
            argv,
            explicit=args.config,
            default=DEFAULT_CONFIG,
            required=("--data-dir",),
        )
        if failed is not None:
            return failed
    try:
        log_format = resolve_log_format(getattr(args, "log_format", None))
    except ValueError as exc:
        return usage_error(PROG, exc)
    configure_logging(getattr(args, "log_level", "INFO"), log_format)
    if args.command == "serve":
        metrics_host, metrics_port = "127.0.0.1", None
        try:
            if args.metrics:
                metrics_host, metrics_port = parse_metrics_address(args.metrics)
            http_host, http_port = parse_host_port(args.http, what="--http")
            grpc_host, grpc_port = parse_host_port(args.grpc, what="--grpc")
            agents_host, agents_port = parse_host_port(args.grpc_agents, what="--grpc-agents")
            if args.grpc_agents_advertise:
                parse_host_port(args.grpc_agents_advertise, what="--grpc-agents-advertise")
            lifetime = parse_duration(args.agent_cert_lifetime, what="--agent-cert-lifetime")
            if lifetime < 10:
                raise ValueError("--agent-cert-lifetime: at least 10 seconds")
        except ValueError as exc:
            return usage_error(PROG, exc)
        advertise = [n.strip() for n in (args.grpc_advertise or "").split(",") if n.strip()]
        config = ControllerConfig(
            data_dir=args.data_dir,
            http_host=http_host,
            http_port=http_port,
            grpc_host=grpc_host,
            grpc_port=grpc_port,
            grpc_agents_host=agents_host,
            grpc_agents_port=agents_port,
            grpc_advertise=advertise or None,
            grpc_agents_advertise=args.grpc_agents_advertise,
            agent_cert_lifetime_seconds=lifetime,
            database_url=args.database,
            public_url=args.public_url,
            s3_endpoint=args.s3_endpoint,
            checkpoint_gc_interval_seconds=args.checkpoint_gc_interval_seconds,
            checkpoint_gc_grace_seconds=args.checkpoint_gc_grace_seconds,
            templates_file=args.templates,
            agent_lost_seconds=args.agent_lost_seconds,
            starting_deadline_seconds=args.starting_deadline_seconds,
            stopping_deadline_seconds=args.stopping_deadline_seconds,
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            secrets_key_file=args.secrets_key_file,
            resync_interval_seconds=args.resync_interval_seconds,
            reconcile_interval_seconds=args.reconcile_interval_seconds,
            agent_lease_seconds=args.agent_lease_seconds,
            job_lease_seconds=args.job_lease_seconds,
        )
        return asyncio.run(_serve(config))
    if args.command == "user" and args.user_command == "add":
        try:
            token = asyncio.run(
                add_user(
                    ControllerConfig(data_dir=args.data_dir, database_url=args.database),
                    name=args.name,
                    email=args.email,
                    workspace_id=args.workspace,
                    role=Role(args.role),
                )
            )
        except StudiosError as exc:
            print(f"studio-controller: {exc.message}", file=sys.stderr)
            return 1
        print(token)
        return 0
    if args.command == "agent":
        return asyncio.run(_agent_command(args))
    return 2


async def _agent_command(args: argparse.Namespace) -> int:
    config = ControllerConfig(data_dir=args.data_dir, database_url=args.database)
    ensure_data_dir(config.data_dir)
    db = Database(config.effective_database_url)
    try:
        await db.migrate()
        key_file = getattr(args, "secrets_key_file", None)
        controller_secrets = await load_controller_secrets(
            db, config.data_dir, read_secrets_key(key_file) if key_file else None
        )
        await bootstrap(db, config.data_dir, controller_secrets.ca)
        if args.agent_command == "token":
            ttl = parse_duration(args.ttl, what="--ttl")
            if args.uses is not None and args.uses < 1:
                raise ValueError("--uses: at least 1")
            token = await enrollment.create_token(
                db,
                controller_secrets.ca,
                name=args.name,
                compute_env_id=args.compute_env,
                workspace_id=args.workspace,
                ttl=timedelta(seconds=ttl) if ttl else None,
                uses=args.uses,
            )
            print(token)
        elif args.agent_command == "list":
            rows = await enrollment.list_agents(db)
            if args.json:
                print(json.dumps([r.as_json() for r in rows], indent=2))
            else:
                _print_agents(rows)
        elif args.agent_command == "revoke":
            revoked = await enrollment.revoke_agent(db, args.agent_id)
            when = enrollment.format_time(revoked.revoked_at)
            if revoked.already:
                print(f"agent {revoked.agent_id} was revoked already, at {when}")
            else:
                print(
                    f"agent {revoked.agent_id} revoked at {when}; sessions errored: "
                    f"{', '.join(revoked.errored) or 'none'}"
                )
        return 0
    except ValueError as exc:
        print(f"studio-controller: {exc}", file=sys.stderr)
        return 2
    except StudiosError as exc:
        print(f"studio-controller: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await db.close()


def _print_agents(rows: list[enrollment.AgentRow]) -> None:
    header = ("ID", "HOST", "COMPUTE ENV", "ENROLLED", "CERT EXPIRES", "CONNECTED", "REVOKED")
    table = [header] + [
        (
            r.agent_id,
            r.hostname,
            r.compute_env_id,
            enrollment.format_time(r.enrolled_at) or "-",
            enrollment.format_time(r.cert_not_after) or "-",
            "yes" if r.connected else "no",
            enrollment.format_time(r.revoked_at) or "-",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


async def _serve(config: ControllerConfig) -> int:
    try:
        await check_config(config)
    except Misconfigured as exc:
        return usage_error(PROG, exc)
    controller = Controller(config)
    systemd = Notifier.from_environment()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Pinged while starting too: a migration may take longer than the watchdog interval.
    watchdog = asyncio.create_task(systemd.watchdog_loop(), name="systemd-watchdog")
    systemd.status("starting: migrating the database, opening the listeners")
    try:
        await controller.start()
    except Exception as exc:
        # One line, not a traceback (that only with --log-level DEBUG): what preflight
        # cannot foresee, e.g. a port taken since it was checked.
        log.debug("start failed", exc_info=True)
        print(f"studio-controller: cannot start: {exc}", file=sys.stderr)
        systemd.stopping(f"failed to start: {exc}")
        watchdog.cancel()
        await controller.stop()
        return 1
    systemd.ready(_serving_status(controller))
    try:
        await stop.wait()
        log.info("stopping (signal received)")
        systemd.stopping()
    finally:
        await controller.stop()
        watchdog.cancel()
    return 0


def _serving_status(controller: Controller) -> str:
    cfg = controller.config
    text = (
        f"serving: HTTP {cfg.http_host}:{controller.http_port}, gRPC enrollment "
        f"{cfg.grpc_host}:{controller.grpc_port}, agents {cfg.grpc_agents_host}:"
        f"{controller.grpc_agents_port}"
    )
    if controller.metrics_server is not None:
        text += f", metrics {cfg.metrics_host}:{controller.metrics_server.port}"
    return text


async def add_user(
    config: ControllerConfig, *, name: str, email: str, workspace_id: int, role: Role
) -> str:
    """Add a user with a role in a workspace; their new API token."""
    ensure_data_dir(config.data_dir)
    db = Database(config.effective_database_url)
    try:
        await db.migrate()
        await bootstrap(db, config.data_dir)
        token = new_token()
        async with db.transaction() as session:
            workspace = await session.get(Workspace, workspace_id)
            if workspace is None or workspace.deleted:
                raise NotFound(f"workspace {workspace_id} not found")
            if await session.scalar(select(User.id).where(User.user_name == name)):
                raise Conflict(f"user {name!r} already exists")
            user = User(user_name=name, email=email)
            session.add(user)
            await session.flush()
            # A member of the workspace's organisation (it sees the organisation's teams).
            session.add(OrgMember(org_id=workspace.org_id, user_id=user.id, role="member"))
            session.add(Participant(workspace_id=workspace_id, user_id=user.id, role=role.value))
            session.add(ApiToken(user_id=user.id, name="cli", token_hash=hash_token(token)))
        return token
    finally:
        await db.close()


if __name__ == "__main__":
    sys.exit(main())
