"""First start: the default organisation, workspace, owner and secrets.

On an empty database: organisation `default` (id 1), workspace `default`
(id 1), user `admin` (owner of organisation 1 and of workspace 1), an API token for it in
`DIR/admin-token` and a join token in `DIR/agent-token` (`sjt1.<CA hash>.<secret>`:
it admits any compute environment of workspace 1, and pins the agent CA). The
master connect key lives in `DIR/connect-key`. All three files are mode 0600. The
agent CA (controller.agent_ca) lives in `DIR/pki/`, created on first start.

A data directory of an older controller holds a plain enrollment token in
`DIR/agent-token`: it is rewritten as a join token with the same secret, so copying
the file to the agents again is the whole upgrade.

On a database that already has an organisation nothing is rewritten: the
tokens exist only hashed, so a lost token file cannot be recreated, and a new
admin would silently replace the operator's; we log what to do instead.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from controller.agent_ca import AgentCA, DirectoryCaFiles
from controller.auth import Role, hash_token, new_token
from controller.db import Database
from controller.models import (
    ApiToken,
    EnrollmentToken,
    Organization,
    OrgMember,
    Participant,
    User,
    Workspace,
)
from studios_shared.agent_pki import format_join_token, parse_join_token

__all__ = [
    "ADMIN_TOKEN_FILE",
    "AGENT_TOKEN_FILE",
    "CONNECT_KEY_FILE",
    "PKI_DIR",
    "bootstrap",
    "ensure_data_dir",
    "load_or_create_connect_key",
    "open_ca",
    "write_secret",
]

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin-token"
AGENT_TOKEN_FILE = "agent-token"
CONNECT_KEY_FILE = "connect-key"
PKI_DIR = "pki"


def open_ca(data_dir: Path) -> AgentCA:
    """The agent CA of this data directory, created on first use (keys 0600)."""
    return AgentCA.open(DirectoryCaFiles(data_dir / PKI_DIR))


def ensure_data_dir(data_dir: Path) -> None:
    """The data directory, the owner's alone (0700), also when an older controller made it wider."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if data_dir.stat().st_mode & 0o777 != 0o700:
        os.chmod(data_dir, 0o700)


def write_secret(path: Path, content: str) -> None:
    """Write `content` to `path` with mode 0600, atomically (tmp file + rename)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_or_create_connect_key(data_dir: Path) -> bytes:
    path = data_dir / CONNECT_KEY_FILE
    if path.exists():
        key = bytes.fromhex(path.read_text().strip())
        if len(key) < 32:
            raise ValueError(f"{path}: connect key too short")
        return key
    key = secrets.token_bytes(32)
    write_secret(path, key.hex())
    log.info("created a new master connect key in %s", path)
    return key


async def bootstrap(db: Database, data_dir: Path, ca: AgentCA | None = None) -> bool:
    """Create the defaults on an empty database. True when it did.

    `ca`: the agent CA join tokens pin (controllers sharing a database share one,
    controller.shared_secrets); None: this data directory's."""
    ca = ca or open_ca(data_dir)
    async with db.transaction() as session:
        if await session.scalar(select(func.count()).select_from(Organization)):
            _check_files(data_dir)
            await _upgrade_agent_token(session, data_dir, ca)
            return False
        admin_token, agent_token = new_token(), new_token()
        session.add(Organization(id=1, name="default", full_name="default"))
        await session.flush()
        session.add(Workspace(id=1, org_id=1, name="default", full_name="default"))
        session.add(User(id=1, user_name="admin", email="admin@localhost"))
        await session.flush()
        session.add(OrgMember(org_id=1, user_id=1, role="owner"))
        session.add(Participant(workspace_id=1, user_id=1, role=Role.OWNER.value))
        session.add(ApiToken(user_id=1, name="bootstrap", token_hash=hash_token(admin_token)))
        session.add(
            EnrollmentToken(name="bootstrap", token_hash=hash_token(agent_token), workspace_id=1)
        )
        # Files before commit: if writing fails, the database stays empty and
        # the next start tries again instead of leaving an admin nobody can use.
        write_secret(data_dir / ADMIN_TOKEN_FILE, admin_token)
        write_secret(data_dir / AGENT_TOKEN_FILE, format_join_token(agent_token, ca.hash))
    if not db.is_sqlite:
        # Explicit ids do not advance PostgreSQL sequences; SQLite needs nothing.
        await _advance_sequences(db)
    log.info(
        "bootstrapped an empty database: organisation 'default' (1), workspace 'default' (1), "
        "user 'admin'; tokens in %s and %s",
        data_dir / ADMIN_TOKEN_FILE,
        data_dir / AGENT_TOKEN_FILE,
    )
    return True


async def _advance_sequences(db: Database) -> None:
    async with db.transaction() as session:
        for table in ("organizations", "workspaces", "users"):
            await session.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT MAX(id) FROM {table}))"
                )
            )


async def _upgrade_agent_token(session: AsyncSession, data_dir: Path, ca: AgentCA) -> None:
    """Rewrite `DIR/agent-token` as a join token of this CA when it is not one (yet).

    Only a token this database knows is rewritten, with its own secret: an older
    controller's plain token, or a join token of a CA that was replaced."""
    path = data_dir / AGENT_TOKEN_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return
    try:
        join = parse_join_token(text)
    except ValueError:
        secret = text
    else:
        if join.ca_hash == ca.hash:
            return
        secret = join.secret
    row = await session.scalar(
        select(EnrollmentToken.id).where(EnrollmentToken.token_hash == hash_token(secret))
    )
    if row is None:
        log.warning("%s holds no token this controller knows; left as it is", path)
        return
    try:
        upgraded = format_join_token(secret, ca.hash)
        parse_join_token(upgraded)
    except ValueError:
        log.warning("%s: the token cannot be written as a join token; left as it is", path)
        return
    write_secret(path, upgraded)
    log.info(
        "%s rewritten as a join token (same secret, CA sha256 %s...): copy it to the agents",
        path,
        ca.hash[:12],
    )


def _check_files(data_dir: Path) -> None:
    for name, what in ((ADMIN_TOKEN_FILE, "admin API"), (AGENT_TOKEN_FILE, "agent enrollment")):
        if not (data_dir / name).exists():
            log.warning(
                "%s is missing but the database is already initialised: the %s token is not "
                "recreated (tokens are stored hashed). Use 'studio-controller user add' for a "
                "new API token%s.",
                data_dir / name,
                what,
                "" if name == ADMIN_TOKEN_FILE else "; agents keep using the token they have",
            )
