"""Local, crash-safe state of the agent: its identity and where the session handles live.

Handles are written *before* the agent reports a change (Nomad's rule), atomically
(temp file + fsync + rename), so that an agent killed at any point finds either the
previous or the new handle after a restart, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

__all__ = [
    "ENDED_STATUSES",
    "StateDir",
    "atomic_write_bytes",
    "atomic_write_json",
]

# Statuses as they are written in handle.json (lower-case API names).
ENDED_STATUSES = frozenset({"stopped", "errored", "buildFailed"})


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, value: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=2, sort_keys=True).encode(), mode)


class StateDir:
    """Layout of `--state-dir`.

    DIR/agent-id                   stable agent identity
    DIR/agent.sock                 admin socket (0600)
    DIR/agent.lock                 one agent per state directory
    DIR/connect-key                last Welcome.connect_token_key (0600)
    DIR/pki/ca.crt                 the controller's CA (the one the join token pins)
    DIR/pki/agent.key              this agent's private key (0600, never leaves the host)
    DIR/pki/agent.crt              its certificate from the controller (agent id, compute env)
    DIR/outbox/<ns>-<digest>.pb    checkpoint events, until the controller acks them
    DIR/sessions/<sid>/handle.json the session handle
    DIR/sessions/<sid>/root/       the session directory (what the tool sees as /)
    DIR/sessions/<sid>/tool.log    the tool's stdout and stderr
    DIR/sessions/<sid>/datalinks/<name>          FUSE mount of a data-link
    DIR/sessions/<sid>/datalinks-private/<name>  its helper's cache and log (0700)
    """

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()

    def ensure(self) -> None:
        """Create the layout: DIR and its directories 0700 (owner only).

        An existing directory that others may read or write is narrowed to 0700 too; one
        that others may only pass through (0711: the local runtime opens the way to a
        session directory for the tool's own user) is left so.
        """
        for directory in (self.root, self.sessions_dir, self.outbox_dir, self.tmp_dir):
            directory.mkdir(mode=0o700, parents=directory is self.root, exist_ok=True)
            if os.stat(directory).st_mode & 0o066:
                os.chmod(directory, 0o700)

    @property
    def socket_path(self) -> Path:
        return self.root / "agent.sock"

    @property
    def lock_path(self) -> Path:
        return self.root / "agent.lock"

    @property
    def connect_key_path(self) -> Path:
        return self.root / "connect-key"

    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    @property
    def ca_cert_path(self) -> Path:
        return self.pki_dir / "ca.crt"

    @property
    def agent_key_path(self) -> Path:
        return self.pki_dir / "agent.key"

    @property
    def agent_cert_path(self) -> Path:
        return self.pki_dir / "agent.crt"

    @property
    def agent_id_path(self) -> Path:
        return self.root / "agent-id"

    @property
    def sessions_dir(self) -> Path:
        return self.root / "sessions"

    @property
    def outbox_dir(self) -> Path:
        return self.root / "outbox"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def default_checkpoint_dir(self) -> Path:
        return self.root / "checkpoints"

    def session_dir(self, session_id: str) -> Path:
        return self.sessions_dir / session_id

    def root_dir(self, session_id: str) -> Path:
        return self.session_dir(session_id) / "root"

    def log_path(self, session_id: str) -> Path:
        return self.session_dir(session_id) / "tool.log"

    def build_log_path(self, session_id: str) -> Path:
        """The log of the session's custom environment build (its latest)."""
        return self.session_dir(session_id) / "build.log"

    def agent_id(self) -> str:
        """The stable agent id, generated on first use."""
        path = self.agent_id_path
        try:
            value = path.read_text().strip()
            if value:
                return value
        except FileNotFoundError:
            pass
        value = uuid.uuid4().hex
        self.save_agent_id(value)
        return value

    def save_agent_id(self, value: str) -> None:
        """The id the controller assigned at enrollment (when it differs from ours)."""
        atomic_write_bytes(self.agent_id_path, (value + "\n").encode())

    def save_handle_json(self, session_id: str, handle: dict[str, Any]) -> None:
        atomic_write_json(self.session_dir(session_id) / "handle.json", handle)

    def load_handle_jsons(self) -> list[dict[str, Any]]:
        """Every session's handle as written (agent.sessions.handle gives them types)."""
        handles: list[dict[str, Any]] = []
        if not self.sessions_dir.is_dir():
            return handles
        for entry in sorted(self.sessions_dir.iterdir()):
            try:
                handles.append(json.loads((entry / "handle.json").read_text()))
            except FileNotFoundError:
                continue
        return handles

    def forget_session(self, session_id: str) -> None:
        from agent.host_mounts import detach_mounts_under_sync

        # A data-link still mounted here would have its bucket emptied by rmtree.
        detach_mounts_under_sync(self.session_dir(session_id))
        shutil.rmtree(self.session_dir(session_id), ignore_errors=True)

    def load_connect_key(self) -> bytes | None:
        try:
            return bytes.fromhex(self.connect_key_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def save_connect_key(self, key: bytes) -> None:
        atomic_write_bytes(self.connect_key_path, key.hex().encode(), mode=0o600)
