"""Encryption at rest of stored secrets (the keys of data-link credentials).

AES-256-GCM with a key kept in `DIR/credentials-key` (hex, mode 0600, created
on first start like the connect key). Each value gets a fresh 96-bit nonce and
is bound to what it belongs to (`context`, e.g. the credentials id) as
associated data, so a ciphertext copied into another row does not decrypt.
Stored form: ``v1:<base64(nonce || ciphertext)>``.

Controllers that share one database must share this file: without it the
stored keys cannot be read (data-links then fail to mount, with a message).

The key is found from a database session (`box_for`): the desired state that
carries the decrypted keys to agents is built from a session alone, and the
key belongs to the database that session reads.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import weakref
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from controller.bootstrap import write_secret

__all__ = [
    "CREDENTIALS_KEY_FILE",
    "SecretBox",
    "SecretError",
    "box_for",
    "load_or_create_credentials_key",
    "register_box",
]

log = logging.getLogger(__name__)

CREDENTIALS_KEY_FILE = "credentials-key"
_PREFIX = "v1:"
_NONCE_BYTES = 12


class SecretError(Exception):
    """A stored secret cannot be decrypted (wrong key file, tampered row)."""


def load_or_create_credentials_key(data_dir: Path) -> bytes:
    path = data_dir / CREDENTIALS_KEY_FILE
    if path.exists():
        key = bytes.fromhex(path.read_text().strip())
        if len(key) != 32:
            raise ValueError(f"{path}: expected a 256-bit key (64 hex characters)")
        return key
    key = AESGCM.generate_key(bit_length=256)
    write_secret(path, key.hex())
    log.info("created a new credentials encryption key in %s", path)
    return key


class SecretBox:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, value: dict[str, Any], context: str) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        plain = json.dumps(value, separators=(",", ":")).encode()
        sealed = self._aead.encrypt(nonce, plain, context.encode())
        return _PREFIX + base64.b64encode(nonce + sealed).decode()

    def open(self, stored: str, context: str) -> dict[str, Any]:
        if not stored.startswith(_PREFIX):
            raise SecretError("unknown secret format")
        try:
            raw = base64.b64decode(stored[len(_PREFIX) :], validate=True)
            plain = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], context.encode())
            value = json.loads(plain)
        except (InvalidTag, ValueError) as exc:
            raise SecretError(
                "cannot decrypt stored credentials (is this the controller's credentials-key?)"
            ) from exc
        if not isinstance(value, dict):
            raise SecretError("stored credentials are not an object")
        return value


# One box per database engine (see the module docstring).
_BOXES: weakref.WeakKeyDictionary[Any, SecretBox] = weakref.WeakKeyDictionary()


def register_box(engine: AsyncEngine, box: SecretBox) -> None:
    _BOXES[engine.sync_engine] = box


def box_for(session: AsyncSession) -> SecretBox | None:
    bind = session.sync_session.get_bind()
    engine = getattr(bind, "engine", bind)
    return _BOXES.get(engine)
