"""What `studio-controller serve` checks before it starts: misconfiguration said once.

Each check names the setting (the flag, as in the config file) and the cause, so that the
operator reads one line instead of a traceback from deep inside the start: the data
directory and the secrets it already holds, the template catalogue, the secrets key, each
listener's address (a port in use, an address not of this host) and the database
(reachable, the credentials taken).

Listening is checked by binding each address (SO_REUSEADDR, as aiohttp and gRPC bind) and
closing it again before the controller binds for real: a port taken in between still
fails the start, with a less precise message. gRPC binds with SO_REUSEPORT, so without
this check a second controller on the same gRPC port would share it silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import create_async_engine

from controller.agent_ca import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY
from controller.bootstrap import CONNECT_KEY_FILE, PKI_DIR, ensure_data_dir
from controller.config import ControllerConfig
from controller.secret_box import CREDENTIALS_KEY_FILE
from controller.shared_secrets import read_secrets_key
from controller.templates import load_catalogue

__all__ = ["Misconfigured", "check_config", "check_data_dir_secrets", "os_reason"]

# How long the database may take to answer the check.
_DATABASE_TIMEOUT_SECONDS = 10.0


@dataclass
class Misconfigured(Exception):
    """One setting is wrong: `setting` (e.g. "--http") and why."""

    setting: str
    cause: str

    def __str__(self) -> str:
        # One line, whatever the cause's own text (a YAML error spans several).
        cause = " ".join(line.strip() for line in self.cause.splitlines() if line.strip())
        return f"{self.setting}: {cause}"


def _read(path: Path) -> bytes | None:
    """The file's bytes, None when it does not exist yet (the start creates it)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Misconfigured("--data-dir", f"cannot read {path}: {os_reason(exc)}") from None


def _check_hex_key(path: Path, size: int) -> None:
    raw = _read(path)
    if raw is None:
        return
    try:
        key = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) < size:
        raise Misconfigured(
            "--data-dir", f"{path}: not a key of {size * 2} hex characters; restore it"
        )


def _check_pem(path: Path, load: Callable[[bytes], object], what: str) -> bool:
    raw = _read(path)
    if raw is None:
        return False
    try:
        load(raw)
    except (ValueError, TypeError) as exc:
        # cryptography's words end in a link to its FAQ: the first sentence is the cause.
        reason = str(exc).split(". See ")[0].strip() or type(exc).__name__
        raise Misconfigured("--data-dir", f"{path}: not {what} ({reason}); restore it") from None
    return True


def _load_key(raw: bytes) -> object:
    return serialization.load_pem_private_key(raw, password=None)


def check_data_dir_secrets(data_dir: Path) -> None:
    """The secrets the data directory already holds can be read and parsed.

    Without this an unreadable or damaged CA key reached the operator as "cannot start:
    Is a directory" or cryptography's PEM message, from deep inside the start, naming no
    setting. Files that do not exist yet are not an error: the first start creates them.
    A damaged file is never replaced: agents trust the CA and sealed credentials need the
    key, so the message asks for the file to be restored."""
    _check_hex_key(data_dir / CONNECT_KEY_FILE, 32)
    _check_hex_key(data_dir / CREDENTIALS_KEY_FILE, 32)
    pki = data_dir / PKI_DIR
    has_key = _check_pem(pki / CA_KEY, _load_key, "a PEM private key")
    has_cert = _check_pem(pki / CA_CERT, x509.load_pem_x509_certificate, "a PEM certificate")
    if has_key != has_cert:
        present, missing = (CA_KEY, CA_CERT) if has_key else (CA_CERT, CA_KEY)
        raise Misconfigured(
            "--data-dir", f"{pki}: the agent CA has {present} but not {missing}; restore it"
        )
    # The server's own pair is re-issued when it does not cover the names, but a file that
    # cannot be read at all stops the start all the same.
    _read(pki / SERVER_KEY)
    _read(pki / SERVER_CERT)


def os_reason(exc: OSError) -> str:
    """The system's words for an OSError ("Address already in use"): asyncio replaces
    `strerror` with a sentence of its own ("Connect call failed ('127.0.0.1', 5432)")."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _check_listen(setting: str, host: str, port: int, held: list[socket.socket]) -> None:
    if port == 0:
        return  # any free port: nothing to collide with
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise Misconfigured(setting, f"cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise Misconfigured(
            setting, f"cannot listen on {_join(host, port)}: {os_reason(exc)}"
        ) from None
    # Held until every listener is checked: two settings naming one port collide here.
    held.append(sock)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_listeners(config: ControllerConfig) -> None:
    listeners = [
        ("--http", config.http_host, config.http_port),
        ("--grpc", config.grpc_host, config.grpc_port),
        ("--grpc-agents", config.grpc_agents_host, config.grpc_agents_port),
    ]
    if config.metrics_port is not None:
        listeners.append(("--metrics", config.metrics_host, config.metrics_port))
    held: list[socket.socket] = []
    try:
        for setting, host, port in listeners:
            _check_listen(setting, host, port, held)
    finally:
        for sock in held:
            sock.close()


async def check_database(config: ControllerConfig) -> None:
    """Connect once and run SELECT 1; Misconfigured naming --database and the cause."""
    url = config.effective_database_url
    try:
        shown = make_url(url).render_as_string(hide_password=True)
        engine = create_async_engine(url)
    except (ArgumentError, ValueError, ImportError) as exc:
        raise Misconfigured("--database", f"not a usable database URL: {exc}") from None
    try:
        async with asyncio.timeout(_DATABASE_TIMEOUT_SECONDS):
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
    except TimeoutError:
        raise Misconfigured(
            "--database",
            f"cannot connect to {shown}: no answer within {_DATABASE_TIMEOUT_SECONDS:.0f} s",
        ) from None
    except Exception as exc:
        # The driver's own words (connection refused, password authentication failed,
        # database does not exist) without SQLAlchemy's wrapping and its link.
        cause = getattr(exc, "orig", None) or exc
        if isinstance(cause, OSError) and cause.errno:
            reason = os_reason(cause)
        else:
            words = str(cause).strip()
            reason = words.splitlines()[0] if words else type(cause).__name__
        raise Misconfigured("--database", f"cannot connect to {shown}: {reason}") from None
    finally:
        with contextlib.suppress(Exception):
            await engine.dispose()


async def check_config(config: ControllerConfig) -> None:
    """Every check, in the order the start would trip over them; Misconfigured."""
    try:
        ensure_data_dir(config.data_dir)
    except OSError as exc:
        raise Misconfigured(
            "--data-dir", f"cannot create {config.data_dir}: {os_reason(exc)}"
        ) from None
    check_data_dir_secrets(config.data_dir)
    try:
        load_catalogue(config.templates_file)
    except ValueError as exc:
        raise Misconfigured("--templates", str(exc)) from None
    if config.secrets_key_file is not None:
        try:
            read_secrets_key(config.secrets_key_file)
        except ValueError as exc:
            # Its message begins with the flag already.
            setting, _, cause = str(exc).partition(" ")
            raise Misconfigured(setting, cause) from None
    check_listeners(config)
    await check_database(config)
