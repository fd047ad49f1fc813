"""safefs, the restore's second layer: no open below the root ever follows a symlink.

The manifest's checks (test_restore_safety) refuse a checkpoint that names a path through
a symlink. These tests take that layer away or go round it: safefs called directly on a
tree that holds symlinks, a forged manifest with `validate()` switched off, and a restore
whose tree is changed under it after the check passed (a directory or a file swapped for a
symlink to a victim outside the target, as a hostile session sharing the volume could).
Each time no write, create, chmod, chown or utime may land in the victim, which stays byte
for byte and stat for stat what it was, and the failure names the path.

Every test runs twice: with openat2 (the kernel resolves beneath the root) and with the
component-by-component walk that safefs falls back to where openat2 is missing.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.checkpoints import engine as E
from agent.checkpoints import safefs
from agent.checkpoints.manifest import Entry, Manifest, encode_manifest
from agent.errors import CheckpointError

# ENOTDIR: the walk's O_DIRECTORY | O_NOFOLLOW open of a symlinked component.
REFUSED = {errno.ELOOP, errno.EXDEV, errno.ENOTDIR}
VICTIM_MTIME_NS = 1_000_000_000_000_000_000  # 2001: nothing the tests write has this mtime


def _openat2_works() -> bool:
    probe = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = safefs._openat2(probe, "proc", os.O_RDONLY | os.O_DIRECTORY, 0)
        os.close(fd)
        return True
    except (OSError, AttributeError):
        return False
    finally:
        os.close(probe)


@pytest.fixture(autouse=True, params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "openat2":
        if not safefs._libc or not _openat2_works():
            pytest.skip("no openat2 here")
        monkeypatch.setattr(safefs, "_have_openat2", True)
    else:
        monkeypatch.setattr(safefs, "_have_openat2", False)
    yield request.param
    if request.param == "openat2":
        # Nothing fell back to the walk silently: openat2 was what these tests tested.
        assert safefs._have_openat2


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every path below `root` (and root itself): type, mode, owner, size, mtime, content."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    body: Any = f.read()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            else:
                body = None
            key = os.path.normpath(os.path.relpath(p, root))
            out[key] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, body)
    return out


def make_victim(victim: Path) -> dict[str, tuple[Any, ...]]:
    """What a symlink could lead a restore to: files named like the restored ones."""
    (victim / "sub").mkdir(parents=True)
    for name in ("secret", "f1", "f2", "f3", "f4"):
        (victim / name).write_bytes(f"victim's {name}, do not touch\n".encode())
    (victim / "sub" / "other").write_bytes(b"victim's sub/other\n")
    for p in [*victim.rglob("*"), victim]:
        os.chmod(p, 0o700 if p.is_dir() else 0o600)
        os.utime(p, ns=(VICTIM_MTIME_NS, VICTIM_MTIME_NS))
    return snapshot(victim)


class World:
    """tmp/box/root (the restore's root, fd open), tmp/box/victim and tmp/box/root/inner.

    In root: `real/` (a plain directory), and symlinks to the victim directory and its
    file `secret` of three kinds: absolute, relative climbing out, and pointing inside
    the root (to `inner/`, itself a victim: safefs refuses every symlink, not just those
    that leave).
    """

    def __init__(self, tmp: Path, where: str):
        self.box = tmp / "box"
        self.root = self.box / "root"
        (self.root / "real").mkdir(parents=True)
        self.victim = self.box / "victim" if where != "inside" else self.root / "inner"
        self.before = make_victim(self.victim)
        if where == "outside-abs":
            dtarget, ftarget = str(self.victim), str(self.victim / "secret")
        elif where == "outside-rel":
            dtarget, ftarget = "../victim", "../victim/secret"
        else:
            dtarget, ftarget = "inner", "inner/secret"
        os.symlink(dtarget, self.root / "link")
        os.symlink(ftarget, self.root / "flink")
        os.symlink(
            "../" + dtarget if not dtarget.startswith("/") else dtarget, self.root / "real" / "link"
        )
        self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        self.box_listing = sorted(os.listdir(self.box))

    def untouched(self) -> None:
        assert snapshot(self.victim) == self.before
        assert sorted(os.listdir(self.box)) == self.box_listing

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture(params=["outside-abs", "outside-rel", "inside"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path, request.param)
    yield w
    w.close()


def attempt(w: World, rel: str, flags: int) -> OSError | None:
    """safe_open as the restore uses it; if it opens anything, do the restore's damage."""
    try:
        fd = safefs.safe_open(w.fd, rel, flags, 0o666)
    except OSError as e:
        return e
    try:
        if flags & (os.O_WRONLY | os.O_RDWR):
            os.pwrite(fd, b"PWNED", 0)
        # What _meta does through the fd of a restored file or directory.
        os.fchown(fd, 4242, 4242)
        os.fchmod(fd, 0o6777)
        os.utime(fd, ns=(0, 0))
    finally:
        os.close(fd)
    return None


def assert_refused(err: OSError | None, rel: str, codes: set[int] = REFUSED) -> None:
    assert err is not None, f"safe_open({rel!r}) opened outside the root or through a symlink"
    assert err.errno in codes, err
    assert err.filename == rel
    assert repr(rel) in str(err)


WRITE_FLAGS = {
    "wronly": os.O_WRONLY,
    "rdwr": os.O_RDWR,
    "trunc": os.O_WRONLY | os.O_TRUNC,
    "append": os.O_WRONLY | os.O_APPEND,
    "creat": os.O_WRONLY | os.O_CREAT,
    "creat-excl": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    "rdonly (meta)": os.O_RDONLY,
}


# ---------------------------------------------------------------------------------------
# safe_open and DirFds, directly


def assert_all_refused(w: World, rel: str, flag_sets: dict[str, int]) -> None:
    """Every way the restore opens a file, each attempt on a fresh look at the victim."""
    for name, flags in flag_sets.items():
        err = attempt(w, rel, flags)
        assert err is not None, f"safe_open({rel!r}, {name}) opened through a symlink"
        assert_refused(err, rel)
        w.untouched()


@pytest.mark.parametrize("rel", ["link/secret", "link/new", "real/link/secret", "link/sub/new"])
def test_symlinked_directory_on_the_way_is_refused(world: World, rel: str) -> None:
    assert_all_refused(world, rel, WRITE_FLAGS)


@pytest.mark.parametrize("rel", ["link", "real/link", "link/sub"])
def test_symlinked_directory_is_not_opened_as_one(world: World, rel: str) -> None:
    assert_refused(attempt(world, rel, os.O_RDONLY | os.O_DIRECTORY), rel)
    world.untouched()


def test_symlink_as_the_last_component_is_refused(world: World) -> None:
    # Not O_CREAT | O_EXCL: that one is EEXIST on a symlink, followed or not.
    flag_sets = {k: v for k, v in WRITE_FLAGS.items() if k != "creat-excl"}
    assert_all_refused(world, "flink", flag_sets)


@pytest.mark.parametrize(
    "rel", ["../victim/secret", "real/../../victim/secret", "..", "real/../..", "ABS"]
)
@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDONLY | os.O_DIRECTORY], ids=["w", "dir"])
def test_dotdot_and_absolute_paths_are_refused(tmp_path: Path, rel: str, flags: int) -> None:
    w = World(tmp_path, "outside-abs")
    try:
        if rel == "ABS":
            rel = str(w.victim / "secret")
        if flags & os.O_DIRECTORY:
            rel = rel.removesuffix("/secret")
        assert_refused(attempt(w, rel, flags), rel, {errno.EXDEV})
        w.untouched()
    finally:
        w.close()


def test_plain_paths_below_the_root_still_open(tmp_path: Path) -> None:
    """The refusals above are not a safe_open that refuses everything."""
    w = World(tmp_path, "outside-abs")
    try:
        fd = safefs.safe_open(w.fd, "real/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, b"ok")
        os.close(fd)
        fd = safefs.safe_open(w.fd, "real/new", os.O_RDONLY)
        assert os.read(fd, 10) == b"ok"
        os.close(fd)
        assert stat.S_IMODE(os.stat(w.root / "real" / "new").st_mode) == 0o640
        fd = safefs.safe_open(w.fd, "real", os.O_RDONLY | os.O_DIRECTORY)
        assert sorted(os.listdir(fd)) == ["link", "new"]
        os.close(fd)
        w.untouched()
    finally:
        w.close()


# What the restore does with a directory fd from DirFds: each must land in the root or not
# happen at all.
DIR_OPS: dict[str, Callable[[int], Any]] = {
    "mkdir": lambda d: os.mkdir("new", 0o777, dir_fd=d),
    "create": lambda d: os.close(
        os.open("new", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666, dir_fd=d)
    ),
    "symlink": lambda d: os.symlink("/", "new", dir_fd=d),
    "mkfifo": lambda d: os.mkfifo("new", 0o666, dir_fd=d),
    "chown": lambda d: os.chown("secret", 4242, 4242, dir_fd=d, follow_symlinks=False),
    "utime": lambda d: os.utime("secret", ns=(0, 0), dir_fd=d, follow_symlinks=False),
    "rename": lambda d: os.rename("secret", "renamed", src_dir_fd=d, dst_dir_fd=d),
    "unlink": lambda d: os.unlink("secret", dir_fd=d),
    "link": lambda d: os.link("secret", "new", src_dir_fd=d, dst_dir_fd=d),
    "fchmod": lambda d: os.fchmod(d, 0o777),
}


@pytest.mark.parametrize("rel", ["link", "real/link", "link/sub"])
def test_dirfds_refuses_a_symlinked_directory(world: World, rel: str) -> None:
    dirs = safefs.DirFds(world.fd)
    try:
        try:
            pfd = dirs.get(rel)
        except OSError as e:
            assert_refused(e, rel)
        else:
            try:
                for op in DIR_OPS.values():
                    try:
                        op(pfd)
                    except OSError:
                        pass
            finally:
                os.close(pfd)
            pytest.fail(f"DirFds.get({rel!r}) opened through a symlink")
    finally:
        dirs.close()
    world.untouched()


def test_dirfds_cache_keeps_the_directory_it_opened(tmp_path: Path) -> None:
    """A directory swapped for a symlink after DirFds opened it: the cached fd still names
    the directory the restore made (moved aside, inside the root), never the victim; once
    evicted, the path is resolved again and refused."""
    w = World(tmp_path, "outside-abs")
    dirs = safefs.DirFds(w.fd, size=1)
    try:
        (w.root / "d").mkdir()
        os.close(dirs.get("d"))
        os.rename(w.root / "d", w.root / "d.moved")
        os.symlink(w.victim, w.root / "d")
        pfd = dirs.get("d")
        try:
            os.close(os.open("new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, dir_fd=pfd))
        finally:
            os.close(pfd)
        assert os.listdir(w.root / "d.moved") == ["new"]
        os.close(dirs.get("real"))  # evicts "d"
        with pytest.raises(OSError) as ei:
            dirs.get("d")
        assert_refused(ei.value, "d")
        w.untouched()
    finally:
        dirs.close()
        w.close()


# ---------------------------------------------------------------------------------------
# Paths longer than PATH_MAX, opened in steps: the same refusals at every step

DEEP_NAME = "d" * 200
# 25 components of 201 bytes below real/: 5,030 bytes, past PATH_MAX (4,096); safefs
# opens such a path in steps of at most 2,048 bytes (10 components here).
DEEP = 25


def _deep_prefix(depth: int) -> str:
    return "/".join(["real", *[DEEP_NAME] * depth])


def _make_deep(w: World, depth: int = DEEP) -> int:
    """real/d.../d... `depth` levels deep, made through fds (too long a path to make by
    name); the deepest directory's fd, for the caller to close."""
    fd = os.open(w.root / "real", os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        if not os.path.lexists(f"/proc/self/fd/{fd}/{DEEP_NAME}"):
            os.mkdir(DEEP_NAME, dir_fd=fd)
        nfd = os.open(DEEP_NAME, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def test_a_path_longer_than_path_max_opens_below_the_root(tmp_path: Path) -> None:
    w = World(tmp_path, "outside-abs")
    try:
        os.close(_make_deep(w))
        rel = _deep_prefix(DEEP) + "/deep.txt"
        assert len(os.fsencode(rel)) > 4096
        fd = safefs.safe_open(w.fd, rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, b"deep")
        os.close(fd)
        fd = safefs.safe_open(w.fd, rel, os.O_RDONLY)
        assert os.read(fd, 10) == b"deep"
        os.close(fd)
        fd = safefs.safe_open(w.fd, _deep_prefix(DEEP), os.O_RDONLY | os.O_DIRECTORY)
        assert os.listdir(fd) == ["deep.txt"]
        os.close(fd)
        w.untouched()
    finally:
        w.close()


# A symlink to the victim at each depth: the first step, the last component of a step
# and the first of the next (10 and 11), the last directory, and past DEEP levels.
@pytest.mark.parametrize("depth", [0, 9, 10, 11, DEEP, DEEP + 6])
@pytest.mark.parametrize("target", ["absolute", "relative"])
def test_a_symlink_anywhere_in_a_long_path_is_refused(
    tmp_path: Path, depth: int, target: str
) -> None:
    w = World(tmp_path, "outside-abs")
    try:
        fd = _make_deep(w, depth)
        # relative: up to the box from real/d.../ (depth + 2 levels), then into the victim.
        to = str(w.victim) if target == "absolute" else "../" * (depth + 2) + "victim"
        os.symlink(to, "deep-link", dir_fd=fd)
        os.close(fd)
        # Long whatever the depth: deep components after the link, then the victim's file.
        rel = "/".join([_deep_prefix(depth), "deep-link", *[DEEP_NAME] * max(0, DEEP - depth)])
        for tail, flag_sets in (("secret", WRITE_FLAGS), ("new", {"creat": os.O_CREAT})):
            path = f"{rel}/{tail}" if depth < DEEP else f"{_deep_prefix(depth)}/deep-link/{tail}"
            for flags in flag_sets.values():
                assert_refused(attempt(w, path, flags), path)
                w.untouched()
        last = f"{_deep_prefix(depth)}/deep-link"
        assert_refused(attempt(w, last, os.O_RDONLY | os.O_DIRECTORY), last)
    finally:
        w.close()


def test_dotdot_in_a_long_path_is_refused(tmp_path: Path) -> None:
    w = World(tmp_path, "outside-abs")
    try:
        os.close(_make_deep(w))
        # Climbs out of the root from the deepest directory, in the last step.
        rel = _deep_prefix(DEEP) + "/.." * (DEEP + 2) + "/victim/secret"
        assert len(os.fsencode(rel)) > 4096
        assert_refused(attempt(w, rel, os.O_WRONLY), rel, {errno.EXDEV})
        w.untouched()
    finally:
        w.close()


def test_a_tree_deeper_than_path_max_is_checkpointed_and_restored(tmp_path: Path) -> None:
    """Once, the first open of such a path failed the whole checkpoint (ENAMETOOLONG):
    a studio holding one could never be saved, nor stopped with its data kept."""
    src = tmp_path / "src"
    (src / "real").mkdir(parents=True)
    fd = os.open(src / "real", os.O_RDONLY | os.O_DIRECTORY)
    for i in range(DEEP):
        os.mkdir(DEEP_NAME, dir_fd=fd)
        nfd = os.open(DEEP_NAME, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
        if i in (5, DEEP - 1):
            f = os.open(f"at{i}.bin", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
            os.write(f, os.urandom(100_000 + i))
            os.close(f)
    os.symlink("at24.bin", "link", dir_fd=fd)
    os.setxattr(f"/proc/self/fd/{fd}/at24.bin", "user.deep", b"yes")
    os.close(fd)
    uri = f"file://{tmp_path}/repo"
    first = E.backup_sync(uri, "s", src)
    assert first.files == 2 and first.warnings == []
    second = E.backup_sync(uri, "s", src, first.uri)
    assert E.verify_sync(second.uri).ok
    for n, cp in enumerate((first.uri, second.uri)):
        out = tmp_path / f"out{n}"
        E.restore_sync(cp, out)
        src_fd, out_fd = os.open(src, os.O_RDONLY), os.open(out, os.O_RDONLY)
        try:
            for rel in (_deep_prefix(6) + "/at5.bin", _deep_prefix(DEEP) + "/at24.bin"):
                a = safefs.safe_open(src_fd, rel, os.O_RDONLY)
                b = safefs.safe_open(out_fd, rel, os.O_RDONLY)
                try:
                    assert os.read(a, 1 << 20) == os.read(b, 1 << 20)
                    assert os.fstat(a).st_mode == os.fstat(b).st_mode
                finally:
                    os.close(a)
                    os.close(b)
            dfd = safefs.safe_open(out_fd, _deep_prefix(DEEP), os.O_RDONLY)
            try:
                assert os.readlink("link", dir_fd=dfd) == "at24.bin"
                assert os.getxattr(f"/proc/self/fd/{dfd}/at24.bin", "user.deep") == b"yes"
            finally:
                os.close(dfd)
        finally:
            os.close(src_fd)
            os.close(out_fd)


# ---------------------------------------------------------------------------------------
# A forged checkpoint, with the manifest's checks switched off


def _forge(uri: str, entries: list[Entry]) -> str:
    repo = E.get_repository(uri)
    m = Manifest("evil", "k1", 0, None, [Entry(".", "dir", 0o755), *entries], [], {})
    repo.backend.save(repo.manifest_name("evil", "k1"), encode_manifest(m))
    return repo.checkpoint_uri("evil", "k1")


FORGED = {
    "through-abs-link": ([Entry("l", "symlink", target="VICTIM"), Entry("l/new", "file")], "l"),
    "through-rel-link": (
        [
            Entry("d", "dir"),
            Entry("d/up", "symlink", target="../../victim"),
            Entry("d/up/new", "dir"),
        ],
        "d/up",
    ),
    "through-link-deep": (
        [Entry("l", "symlink", target="VICTIM"), Entry("l/sub/new", "symlink", target="/")],
        "l/sub",
    ),
    "dotdot": ([Entry("../victim/new", "file")], "../victim"),
    "dotdot-inner": ([Entry("d", "dir"), Entry("d/../../victim/new", "file")], "d/../../victim"),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_checkpoint_without_the_manifest_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    box = tmp_path / "box"
    victim = box / "victim"
    before = make_victim(victim)
    entries, refused = FORGED[case]
    entries = [
        dataclasses.replace(e, target=str(victim)) if e.target == "VICTIM" else e for e in entries
    ]
    cp = _forge(f"file://{tmp_path}/repo", entries)
    monkeypatch.setattr(E, "validate", lambda m: None)  # layer one gone
    with pytest.raises(CheckpointError) as ei:
        E.restore_sync(cp, box / "target")
    cause = ei.value.__cause__
    assert isinstance(cause, OSError) and cause.errno in REFUSED, ei.value
    assert cause.filename == refused
    assert repr(refused) in str(ei.value)
    assert snapshot(victim) == before
    assert sorted(os.listdir(box)) == ["target", "victim"]


# ---------------------------------------------------------------------------------------
# The tree changed under a running restore, after the manifest check passed


def _checkpoint(tmp_path: Path) -> str:
    src = tmp_path / "src"
    (src / "d" / "sub").mkdir(parents=True)
    for name in ("f1", "f2", "f3", "f4"):
        (src / "d" / name).write_bytes(f"restored {name}\n".encode() * 100)
        os.chmod(src / "d" / name, 0o755)
    (src / "d" / "sub" / "g").write_bytes(b"restored g\n")
    # Empty files and files in several chunks take the other paths: created by _create,
    # written (if at all) and given their metadata by path.
    (src / "d" / "empty").write_bytes(b"")
    (src / "d" / "sub" / "empty").write_bytes(b"")
    (src / "d" / "big").write_bytes(random.Random(0).randbytes(3 * 1024 * 1024))
    (src / "top").write_bytes(b"top\n")
    os.chmod(src / "d", 0o755)
    return E.backup_sync(f"file://{tmp_path}/repo", "s", src).uri


def _swap_for_link(path: Path, to: Path) -> None:
    """The hostile session's move: `path` (a directory or file) becomes a symlink to `to`."""
    os.rename(path, path.with_name(path.name + ".moved"))
    os.symlink(to, path)


SafeOpen = Callable[[int, str, int, int], int]


def _hook(
    monkeypatch: pytest.MonkeyPatch,
    module: Any,
    when: Callable[[str, int], bool],
    act: Callable[[], None],
) -> list[str]:
    """Wrap `module.safe_open`: the first call that `when` picks runs `act` first."""
    real: SafeOpen = module.safe_open
    fired: list[str] = []

    def wrapper(root_fd: int, rel: str, flags: int, mode: int = 0o600) -> int:
        if not fired and when(rel, flags):
            fired.append(rel)
            act()
        return real(root_fd, rel, flags, mode)

    monkeypatch.setattr(module, "safe_open", wrapper)
    return fired


RACES = {
    # _fill creates each file whose data is one blob, by path, writes it and sets its
    # metadata through that one fd.
    "dir-swapped-before-data": (
        E,
        lambda rel, flags: rel.startswith("d/") and bool(flags & os.O_WRONLY),
        "d",
        "",
    ),
    # A file in several chunks was created by _create; _fill opens it again by path.
    "dir-swapped-before-data-in-chunks": (
        E,
        lambda rel, flags: rel == "d/big" and flags & (os.O_WRONLY | os.O_CREAT) == os.O_WRONLY,
        "d",
        "",
    ),
    # _meta opens each file not written whole (here an empty one) by path to chown,
    # chmod and utime it.
    "file-swapped-before-meta": (
        E,
        lambda rel, flags: rel == "d/empty" and flags == os.O_RDONLY,
        "d/empty",
        "f2",
    ),
    # ...and each directory, deepest first.
    "dir-swapped-before-its-meta": (
        E,
        lambda rel, flags: rel == "d" and bool(flags & os.O_DIRECTORY),
        "d",
        "",
    ),
    "parent-swapped-before-dir-meta": (
        E,
        lambda rel, flags: rel == "d/sub" and bool(flags & os.O_DIRECTORY),
        "d",
        "",
    ),
    # _create asks DirFds for each parent directory (safefs.safe_open on a miss), here
    # for d/sub/empty.
    "parent-swapped-before-create": (
        safefs,
        lambda rel, flags: rel == "d/sub",
        "d",
        "",
    ),
}


@pytest.mark.parametrize("race", sorted(RACES))
def test_tree_swapped_under_a_running_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    module, when, swapped, victim_part = RACES[race]
    cp = _checkpoint(tmp_path)
    box = tmp_path / "box"
    victim = box / "victim"
    before = make_victim(victim)
    target = box / "target"
    fired = _hook(
        monkeypatch,
        module,
        when,
        lambda: _swap_for_link(target / swapped, victim / victim_part),
    )
    with pytest.raises(CheckpointError) as ei:
        E.restore_sync(cp, target, threads=1)
    assert fired, "the race never ran"
    cause = ei.value.__cause__
    assert isinstance(cause, OSError) and cause.errno in REFUSED, ei.value
    assert cause.filename == fired[0]
    assert repr(fired[0]) in str(ei.value)
    assert snapshot(victim) == before
    assert sorted(os.listdir(box)) == ["target", "victim"]


def test_unraced_restore_of_the_same_checkpoint_succeeds(tmp_path: Path) -> None:
    """The race tests fail because of the swap, not because the checkpoint is bad."""
    cp = _checkpoint(tmp_path)
    E.restore_sync(cp, tmp_path / "target", threads=1)
    assert snapshot(tmp_path / "target") == snapshot(tmp_path / "src")
