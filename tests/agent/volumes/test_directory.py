"""The `directory` volume kind: its accounting and its release, at any depth."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.volumes.base import VolumeInfo
from agent.volumes.directory import DirectoryVolume, directory_usage

BLOCK = 4096


@pytest.fixture(autouse=True)
def remove_deep_trees(tmp_path: Path) -> Iterator[None]:
    """pytest removes old temporary directories with a recursive rmtree, which these
    trees would break (RecursionError at the end of a later run): gone after each test."""
    yield
    subprocess.run(["rm", "-rf", "--", str(tmp_path)], check=True)


def _nest(top: Path, depth: int, name: str = "d") -> int:
    """`depth` directories below `top`, made through fds (deep paths cannot be made by
    name); the deepest one's fd, for the caller to close."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def _write(dir_fd: int, name: str, size: int) -> int:
    """The bytes the new file takes on disk."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, os.urandom(size))
        os.fsync(fd)
        return os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)


def test_usage_counts_a_hard_link_once_and_leaves_data_links_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "workspace" / "data" / "bucket").mkdir(parents=True)
    (root / "workspace" / "data" / "bucket" / "big").write_bytes(os.urandom(64 * BLOCK))
    (root / "a").write_bytes(os.urandom(8 * BLOCK))
    os.link(root / "a", root / "a-again")
    (root / "link").symlink_to("/usr")
    base = directory_usage(root)
    (root / "b").write_bytes(os.urandom(16 * BLOCK))
    os.sync()
    # The new file's blocks, and nothing of the bucket nor /usr through the symlink.
    assert directory_usage(root) - base == os.lstat(root / "b").st_blocks * 512
    assert base < 64 * BLOCK


def test_usage_of_a_tree_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    """os.walk recursed: 1,500 levels raised RecursionError and the disk meter got no
    figure for the session at all."""
    root = tmp_path / "root"
    root.mkdir()
    before = directory_usage(root)
    fd = _nest(root, 1500)
    try:
        deep = _write(fd, "deep.bin", 32 * BLOCK)
    finally:
        os.close(fd)
    assert directory_usage(root) - before >= deep


async def test_release_removes_a_tree_deeper_than_path_max(tmp_path: Path) -> None:
    """shutil.rmtree recursed too: such a tree raised RecursionError (through
    ignore_errors) and the session's directory was never released."""
    vol = DirectoryVolume()
    info = await vol.prepare(tmp_path / "s" / "root", 1 << 30)
    fd = _nest(Path(info.path), 3000, "dd")  # 9,000 bytes of path
    try:
        _write(fd, "deep.bin", BLOCK)
    finally:
        os.close(fd)
    await vol.release(info)
    assert not os.path.lexists(info.path)


async def test_release_never_deletes_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the session's")
    vol = DirectoryVolume()
    info: VolumeInfo = await vol.prepare(tmp_path / "s" / "root", 1 << 30)
    (Path(info.path) / "escape").symlink_to(outside)
    (Path(info.path) / "sub").mkdir()
    (Path(info.path) / "sub" / "escape-file").symlink_to(outside / "keep.txt")
    await vol.release(info)
    assert not os.path.lexists(info.path)
    assert (outside / "keep.txt").read_text() == "not the session's"
