"""The agent's state directory is the agent's own (issue 13): 0700, also when it was wider."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agent.state import StateDir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_dir_is_created_0700(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        state = StateDir(tmp_path / "a" / "state")
        state.ensure()
    finally:
        os.umask(old)
    for directory in (state.root, state.sessions_dir, state.outbox_dir, state.tmp_dir):
        assert _mode(directory) == 0o700, directory


def test_wider_state_dir_is_narrowed_but_a_pass_through_is_kept(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    os.chmod(state.root, 0o755)
    os.chmod(state.outbox_dir, 0o777)
    # The local runtime lets a tool's own user pass through to its session directory.
    os.chmod(state.sessions_dir, 0o711)
    state.ensure()
    assert _mode(state.root) == 0o700
    assert _mode(state.outbox_dir) == 0o700
    assert _mode(state.sessions_dir) == 0o711
