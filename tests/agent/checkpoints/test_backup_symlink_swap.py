"""A session swapping a directory for a symlink while its checkpoint runs.

The agent backs up as root a tree the session's user owns. The user may replace a
directory the walk has already seen by a symlink to anywhere on the host; following it
would store that place's files (/etc/shadow) in a checkpoint the user can restore and
read. The swap is made at the exact moment that matters by wrapping the engine's walk:
after the walk yields the directory (before it lists it), or after it yields a file of
it (before a reader opens it). Nothing from outside may reach the checkpoint.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.checkpoints import engine as E

SECRET = b"host secret: must never enter a checkpoint\n"


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    outside = tmp_path / "host-etc"
    outside.mkdir()
    (outside / "shadow").write_bytes(SECRET)
    (outside / "data.txt").write_bytes(SECRET)
    src = tmp_path / "session"
    (src / "work").mkdir(parents=True)
    (src / "work" / "data.txt").write_bytes(b"the user's own data\n")
    (src / "top.txt").write_bytes(b"top\n")
    return src, outside


def _swap_at(monkeypatch: pytest.MonkeyPatch, src: Path, outside: Path, when: str) -> None:
    """Swap `src/work` for a symlink to `outside` once the walk yields `when`."""
    walk = E._walk

    def swapping(*args: object) -> Iterator[tuple[str, os.stat_result]]:
        for rel, st in walk(*args):  # type: ignore[arg-type]
            if rel == when:
                shutil.rmtree(src / "work")
                (src / "work").symlink_to(outside)
            yield rel, st

    monkeypatch.setattr(E, "_walk", swapping)


def _stored_bytes(tmp_path: Path, uri: str) -> bytes:
    out = tmp_path / "restored"
    out.mkdir()
    E.restore_sync(uri, out)
    found = b""
    for dirpath, _dirs, files in os.walk(out):
        for name in files:
            p = Path(dirpath, name)
            if not p.is_symlink():
                found += p.read_bytes()
    return found


@pytest.mark.parametrize(
    "when",
    [
        pytest.param("work", id="directory-swapped-before-it-is-listed"),
        pytest.param("work/data.txt", id="directory-swapped-before-its-file-is-read"),
    ],
)
def test_a_directory_swapped_for_a_symlink_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    src, outside = _tree(tmp_path)
    _swap_at(monkeypatch, src, outside, when)
    store = f"file://{tmp_path / 'store'}"
    result = E.backup_sync(store, "swap", src, threads=2)
    stored = _stored_bytes(tmp_path, result.uri)
    assert SECRET not in stored
    assert b"top\n" in stored  # the rest of the session is still checkpointed
