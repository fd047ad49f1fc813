"""Opening paths below a root directory without ever following a symlink.

Restore writes into a directory that a restored tree could otherwise redirect: every
open goes through `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` where the kernel has
it (Linux >= 5.6), else a walk of the path one component at a time with O_NOFOLLOW. A
path longer than the kernel takes (PATH_MAX) is opened in steps, each with those rules.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections import OrderedDict

__all__ = ["DirFds", "safe_open"]

_SYS_OPENAT2 = 437  # same number on x86_64 and aarch64
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc: ctypes.CDLL | None
try:
    _cdll = ctypes.CDLL(None, use_errno=True)
    _cdll.syscall.restype = ctypes.c_long
    _libc = _cdll
except OSError:
    _libc = None
_have_openat2 = _libc is not None


def _openat2(root_fd: int, rel: str, flags: int, mode: int) -> int:
    how = _OpenHow(
        flags | os.O_CLOEXEC,
        mode if flags & os.O_CREAT else 0,
        _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS,
    )
    assert _libc is not None
    fd = _libc.syscall(
        _SYS_OPENAT2,
        ctypes.c_int(root_fd),
        ctypes.c_char_p(os.fsencode(rel)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), rel)
    return int(fd)


def _walk_open(root_fd: int, rel: str, flags: int, mode: int) -> int:
    parts = rel.split("/")
    # O_NOFOLLOW says nothing about "..": refuse it (and an absolute path) as
    # RESOLVE_BENEATH does, with EXDEV, or "../x" opens beside the root, not below it.
    if rel.startswith("/") or ".." in parts:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), rel)
    fd = root_fd
    try:
        for p in parts[:-1]:
            nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            if fd != root_fd:
                os.close(fd)
            fd = nfd
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    except OSError as e:
        # Name the whole path, as openat2 does, not just the component that failed.
        raise OSError(e.errno, e.strerror, rel) from None
    finally:
        if fd != root_fd:
            os.close(fd)


# A path handed to the kernel holds at most PATH_MAX bytes with its NUL. A session can
# nest deeper than that (a runaway copy, deep node_modules): such a path is opened in
# steps of whole components, each below the directory the step before opened and under
# the same rules, so no step can leave the root either.
_PATH_MAX = 4096
_STEP_BYTES = 2048


def _steps(rel: str) -> list[str]:
    """`rel` cut at component boundaries into pieces of at most _STEP_BYTES bytes (a
    component is at most 255)."""
    steps: list[str] = []
    piece: list[str] = []
    size = 0
    for part in rel.split("/"):
        n = len(os.fsencode(part)) + 1
        if piece and size + n > _STEP_BYTES:
            steps.append("/".join(piece))
            piece, size = [], 0
        piece.append(part)
        size += n
    steps.append("/".join(piece))
    return steps


def safe_open(root_fd: int, rel: str, flags: int, mode: int = 0o600) -> int:
    """Open `rel` below `root_fd`; any symlink on the way (or at the end) is an error."""
    if rel in (".", ""):
        return os.dup(root_fd)
    # A character is at most 4 bytes: only a long str can be too long a path.
    if len(rel) >= _PATH_MAX // 4 and len(os.fsencode(rel)) >= _PATH_MAX:
        return _open_in_steps(root_fd, rel, flags, mode)
    return _open_below(root_fd, rel, flags, mode)


def _open_in_steps(root_fd: int, rel: str, flags: int, mode: int) -> int:
    *dirs, last = _steps(rel)
    fd = root_fd
    try:
        for step in dirs:
            nfd = _open_below(fd, step, os.O_RDONLY | os.O_DIRECTORY, 0)
            if fd != root_fd:
                os.close(fd)
            fd = nfd
        return _open_below(fd, last, flags, mode)
    except OSError as e:
        # Name the whole path, as a single open does, not the step that failed.
        raise OSError(e.errno, e.strerror, rel) from None
    finally:
        if fd != root_fd:
            os.close(fd)


def _open_below(root_fd: int, rel: str, flags: int, mode: int) -> int:
    global _have_openat2
    if _have_openat2:
        try:
            return _openat2(root_fd, rel, flags | os.O_NOFOLLOW, mode)
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EPERM):
                raise
            _have_openat2 = False
    return _walk_open(root_fd, rel, flags, mode)


class DirFds:
    """A small LRU of directory fds below a root, so siblings share one open."""

    def __init__(self, root_fd: int, size: int = 128):
        self.root_fd = root_fd
        self.size = size
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, rel: str) -> int:
        """A dup of the directory's fd: the caller closes it (the cache may evict)."""
        if rel in (".", ""):
            return os.dup(self.root_fd)
        with self._lock:
            fd = self._fds.get(rel)
            if fd is not None:
                self._fds.move_to_end(rel)
                return os.dup(fd)
        fd = safe_open(self.root_fd, rel, os.O_RDONLY | os.O_DIRECTORY)
        with self._lock:
            if rel in self._fds:
                os.close(fd)
                return os.dup(self._fds[rel])
            self._fds[rel] = fd
            while len(self._fds) > self.size:
                _, old = self._fds.popitem(last=False)
                os.close(old)
            return os.dup(fd)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
