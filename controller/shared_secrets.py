"""The secrets every controller of one database shares, sealed in that database.

A cookie, connect token, sealed credential or agent certificate made by one controller
must be valid at every other, so controllers sharing a database share one agent CA, one
master connect key (the sign-in key is derived from it) and one credentials key. They are
kept in `controller_secrets`, each sealed with AES-256-GCM (controller.secret_box) under
the *secrets key* every controller is given (`--secrets-key-file`, 64 hex characters;
the database alone never reveals them) and bound to its name.

The first controller creates them under a transaction-scoped advisory lock (PostgreSQL;
SQLite serialises writers anyway), so two controllers starting at once agree on one set;
the others load it. A controller that ran alone before brings its own files (the data
directory's connect key, credentials key and `pki/` CA) instead of new ones, so its
enrolled agents, cookies and sealed credentials stay valid.

Without `--secrets-key-file` nothing changes: each controller keeps its secrets in its
data directory (controller.bootstrap), which is right for the single controller.
"""

from __future__ import annotations

import logging
import secrets as random_secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select, text

from controller.agent_ca import CA_CERT, CA_KEY, AgentCA, CaFiles, DirectoryCaFiles
from controller.bootstrap import (
    CONNECT_KEY_FILE,
    PKI_DIR,
    load_or_create_connect_key,
    open_ca,
)
from controller.db import Database
from controller.models import ControllerSecret
from controller.secret_box import (
    CREDENTIALS_KEY_FILE,
    SecretBox,
    SecretError,
    load_or_create_credentials_key,
)

__all__ = [
    "ControllerSecrets",
    "SecretsKeyError",
    "load_controller_secrets",
    "read_secrets_key",
]

log = logging.getLogger(__name__)

_CONNECT = "connect-key"
_CREDENTIALS = "credentials-key"
_CA_KEY = "agent-ca-key"
_CA_CERT = "agent-ca-cert"
_NAMES = (_CONNECT, _CREDENTIALS, _CA_KEY, _CA_CERT)
# pg_advisory_xact_lock's key for creating the set ("studios secrets", arbitrary).
_CREATE_LOCK = 0x5354_5345_4352


class SecretsKeyError(ValueError):
    """The secrets key file is missing, unreadable or malformed, or does not open the
    database's secrets (the message names the file and the cause)."""


@dataclass(frozen=True)
class ControllerSecrets:
    connect_key: bytes
    credentials_key: bytes
    ca: AgentCA
    # True: loaded from (or created in) the database, shared with every controller.
    shared: bool


def read_secrets_key(path: Path) -> bytes:
    """The 256-bit key in `path` (64 hex characters)."""
    try:
        raw = path.read_text().strip()
    except OSError as exc:
        raise SecretsKeyError(
            f"--secrets-key-file {path}: cannot read it ({exc.strerror or exc}); create it "
            "once with `python3 -c 'import secrets; print(secrets.token_hex(32))' > FILE` "
            "and give every controller of the database the same file"
        ) from None
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise SecretsKeyError(
            f"--secrets-key-file {path}: expected 64 hex characters (a 256-bit key)"
        )
    return key


class _SharedCaFiles:
    """The CA's key and certificate from the database; the controller's own server
    certificate (its names are its own) in its data directory."""

    def __init__(self, ca_key: bytes, ca_cert: bytes, local: Path) -> None:
        self._shared = {CA_KEY: ca_key, CA_CERT: ca_cert}
        self._local = DirectoryCaFiles(local)

    def read(self, name: str) -> bytes | None:
        return self._shared[name] if name in self._shared else self._local.read(name)

    def write(self, name: str, data: bytes, *, secret: bool) -> None:
        if name in self._shared:
            raise SecretsKeyError(f"the shared agent CA's {name} is never rewritten")
        self._local.write(name, data, secret=secret)


class _MemoryCaFiles:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def read(self, name: str) -> bytes | None:
        return self.files.get(name)

    def write(self, name: str, data: bytes, *, secret: bool) -> None:
        self.files[name] = data


def _seed(data_dir: Path) -> dict[str, bytes]:
    """The data directory's own secrets where it has them, else new ones."""
    seeded: dict[str, bytes] = {}
    connect = data_dir / CONNECT_KEY_FILE
    seeded[_CONNECT] = (
        bytes.fromhex(connect.read_text().strip())
        if connect.exists()
        else random_secrets.token_bytes(32)
    )
    credentials = data_dir / CREDENTIALS_KEY_FILE
    seeded[_CREDENTIALS] = (
        bytes.fromhex(credentials.read_text().strip())
        if credentials.exists()
        else AESGCM.generate_key(bit_length=256)
    )
    pki = DirectoryCaFiles(data_dir / PKI_DIR)
    key, cert = pki.read(CA_KEY), pki.read(CA_CERT)
    if key is None or cert is None:
        memory = _MemoryCaFiles()
        AgentCA.open(memory)
        key, cert = memory.files[CA_KEY], memory.files[CA_CERT]
    seeded[_CA_KEY], seeded[_CA_CERT] = key, cert
    return seeded


async def _load_or_create(db: Database, box: SecretBox, data_dir: Path) -> dict[str, bytes]:
    async with db.transaction() as session:
        if not db.is_sqlite:
            await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CREATE_LOCK})
        rows = {r.name: r for r in (await session.scalars(select(ControllerSecret))).all()}
        created = []
        if len(rows) < len(_NAMES):
            seeded = _seed(data_dir)
            for name in _NAMES:
                if name not in rows:
                    rows[name] = ControllerSecret(
                        name=name, sealed=box.seal({"hex": seeded[name].hex()}, _context(name))
                    )
                    session.add(rows[name])
                    created.append(name)
    if created:
        log.info(
            "stored the controllers' shared secrets in the database (%s), sealed under the "
            "secrets key",
            ", ".join(created),
        )
    out = {}
    for name in _NAMES:
        try:
            out[name] = bytes.fromhex(str(box.open(rows[name].sealed, _context(name))["hex"]))
        except (SecretError, KeyError, ValueError) as exc:
            raise SecretsKeyError(
                f"--secrets-key-file does not open the database's shared secret {name!r} "
                f"({exc}): every controller of one database needs the same secrets key file"
            ) from None
    return out


def _context(name: str) -> str:
    return f"controller-secret:{name}"


async def load_controller_secrets(
    db: Database, data_dir: Path, secrets_key: bytes | None
) -> ControllerSecrets:
    """The controller's secrets: shared through the database when it has a secrets key,
    else its data directory's own (created on first use)."""
    if secrets_key is None:
        return ControllerSecrets(
            connect_key=load_or_create_connect_key(data_dir),
            credentials_key=load_or_create_credentials_key(data_dir),
            ca=open_ca(data_dir),
            shared=False,
        )
    values = await _load_or_create(db, SecretBox(secrets_key), data_dir)
    files: CaFiles = _SharedCaFiles(values[_CA_KEY], values[_CA_CERT], data_dir / PKI_DIR)
    return ControllerSecrets(
        connect_key=values[_CONNECT],
        credentials_key=values[_CREDENTIALS],
        ca=AgentCA.open(files),
        shared=True,
    )
