"""`studio-controller`: the command line.

    studio-controller serve --data-dir DIR [--http HOST:PORT] [--grpc HOST:PORT]
                            [--database URL] [--public-url URL]
    studio-controller user add --data-dir DIR --name NAME --email EMAIL
                               [--workspace ID] [--role ROLE] [--database URL]

`serve` logs to stderr and stops cleanly on SIGTERM and SIGINT. `user add`
prints the new user's API token on stdout, once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from sqlalchemy import select

from controller.app import Controller
from controller.auth import Role, hash_token, new_token
from controller.bootstrap import bootstrap, ensure_data_dir
from controller.config import ControllerConfig, parse_host_port
from controller.db import Database
from controller.errors import Conflict, NotFound, StudiosError
from controller.models import ApiToken, Participant, User, Workspace

__all__ = ["add_user", "main"]

log = logging.getLogger("controller")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio-controller", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the controller (REST + gRPC)")
    serve.add_argument("--data-dir", required=True, type=Path)
    serve.add_argument("--http", default="127.0.0.1:8080", metavar="HOST:PORT")
    serve.add_argument("--grpc", default="127.0.0.1:8081", metavar="HOST:PORT")
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
    serve.add_argument("--log-level", default="INFO")

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(args, "log_level", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "serve":
        try:
            http_host, http_port = parse_host_port(args.http, what="--http")
            grpc_host, grpc_port = parse_host_port(args.grpc, what="--grpc")
        except ValueError as exc:
            print(f"studio-controller: {exc}", file=sys.stderr)
            return 2
        config = ControllerConfig(
            data_dir=args.data_dir,
            http_host=http_host,
            http_port=http_port,
            grpc_host=grpc_host,
            grpc_port=grpc_port,
            database_url=args.database,
            public_url=args.public_url,
            s3_endpoint=args.s3_endpoint,
            checkpoint_gc_interval_seconds=args.checkpoint_gc_interval_seconds,
            checkpoint_gc_grace_seconds=args.checkpoint_gc_grace_seconds,
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
    return 2


async def _serve(config: ControllerConfig) -> int:
    controller = Controller(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await controller.start()
    except Exception as exc:
        log.exception("studio-controller failed to start: %s", exc)
        await controller.stop()
        return 1
    try:
        await stop.wait()
        log.info("stopping (signal received)")
    finally:
        await controller.stop()
    return 0


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
            if await session.get(Workspace, workspace_id) is None:
                raise NotFound(f"workspace {workspace_id} not found")
            if await session.scalar(select(User.id).where(User.user_name == name)):
                raise Conflict(f"user {name!r} already exists")
            user = User(user_name=name, email=email)
            session.add(user)
            await session.flush()
            session.add(Participant(workspace_id=workspace_id, user_id=user.id, role=role.value))
            session.add(ApiToken(user_id=user.id, name="cli", token_hash=hash_token(token)))
        return token
    finally:
        await db.close()


if __name__ == "__main__":
    sys.exit(main())
