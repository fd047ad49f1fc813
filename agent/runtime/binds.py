"""Making bind mounts visible under a `local` session's root directory.

As root each one is a real bind mount (private propagation, remounted read-only where
asked), so the tool cannot tell it from a directory; without root it is a symlink to
the host path, which is all an unprivileged agent can do. Path components inside the
session root are never followed through symlinks: a restored checkpoint could hold a
`workspace -> /etc` link, and the mount must not land outside the root.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

from agent.host_mounts import is_mount_point
from agent.runtime.base import BindMount

__all__ = ["expose_binds", "session_path"]


def session_path(root_dir: Path, target: str) -> Path:
    """`target` (absolute, inside the session) as a host path below `root_dir`."""
    parts = [p for p in target.split("/") if p]
    if not target.startswith("/") or not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"bad mount path {target!r}: must be absolute, without . or ..")
    return root_dir.joinpath(*parts)


def _make_dirs(root_dir: Path, dest: Path) -> None:
    """mkdir -p from `root_dir` down to dest's parent, refusing symlinked components."""
    current = root_dir
    for part in dest.relative_to(root_dir).parts[:-1]:
        current = current / part
        if current.is_symlink():
            raise ValueError(f"{current} is a symlink; refusing to mount through it")
        current.mkdir(exist_ok=True)


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {(proc.stderr or proc.stdout).strip()}")


def expose_binds(
    root_dir: Path, mounts: Iterable[BindMount], *, as_root: bool | None = None
) -> None:
    """Bind (or symlink) each mount at its target below `root_dir`; idempotent."""
    privileged = os.geteuid() == 0 if as_root is None else as_root
    for m in mounts:
        dest = session_path(root_dir, m.target)
        _make_dirs(root_dir, dest)
        if dest.is_symlink():
            dest.unlink()  # a link from an earlier unprivileged run, or a checkpoint
        if privileged:
            if is_mount_point(dest):
                continue
            dest.mkdir(exist_ok=True)
            _run("mount", "--bind", str(m.source), str(dest))
            _run("mount", "--make-private", str(dest))
            if m.read_only:
                _run("mount", "-o", "remount,bind,ro", str(dest))
        else:
            if dest.is_dir() and not any(dest.iterdir()):
                dest.rmdir()
            os.symlink(m.source, dest)
