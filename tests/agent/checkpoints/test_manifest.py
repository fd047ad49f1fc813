"""The manifest's entry text and names that are not UTF-8.

A file name on Linux is bytes; Python gives one that is not UTF-8 (a zip made on Windows,
a latin-1 tarball) as a str with lone surrogates. A checkpoint must keep such a name, byte
for byte, through the manifest and back.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import zstandard

from agent.checkpoints import engine as E
from agent.checkpoints.manifest import Entry, Manifest, decode_manifest, encode_manifest

# b"caf\xe9" (latin-1), as os.fsdecode gives it.
LATIN1 = os.fsdecode(b"caf\xe9")


def _dumps(e: Entry) -> str:
    return json.dumps(e.to_json(), separators=(",", ":"), ensure_ascii=False)


ENTRIES = [
    Entry(path="d", type="dir", mode=0o755),
    Entry(
        path="a/plain.py", type="file", mode=0o644, mtime_ns=1, size=3, ino=7, chunks=("ab" * 32,)
    ),
    Entry(
        path="a/many",
        type="file",
        uid=1000,
        gid=1000,
        mtime_ns=1_700_000_000_123_456_789,
        ctime_ns=1_700_000_000_123_456_790,
        size=9 << 30,
        ino=2**40,
        chunks=("cd" * 32, "ef" * 32, "01" * 32),
    ),
    Entry(path='quote"back\\slash\ttab\x01ctl\u2028sep', type="file"),
    Entry(path="données/ünï/日本語/😀", type="file", size=1, chunks=("00" * 32,)),
    Entry(path=f"latin1/{LATIN1}", type="file", size=2, chunks=("11" * 32,)),
    Entry(path="ln", type="symlink", target=f'../{LATIN1}/x"y'),
    Entry(path="hard", type="hardlink", target="a/plain.py"),
    Entry(path="changing", type="file", inconsistent=True, size=5, chunks=("22" * 32,)),
    Entry(path="fifo", type="fifo", mode=0o600),
    Entry(path="wh", type="whiteout", mode=0),
    Entry(path="x", type="file", xattrs={"user.k": b"\x00\xff", f"user.{LATIN1}": b"v"}),
    # Not ints as a stat gives them: json's own path, so the text is still JSON's.
    Entry(path="odd", type="file", mode=True),
    Entry(path="odd2", type="file", size=2.5),  # type: ignore[arg-type]
    # Nor is a name or chunk id that is not a str (a manifest edited by hand, read back).
    Entry(path="odd3", type="symlink", target=5),  # type: ignore[arg-type]
    Entry(path="odd4", type="file", size=1, chunks=(7,)),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: repr(e.path)[:20])
def test_entry_text_is_what_json_dumps_writes(entry: Entry) -> None:
    assert entry.to_json_text() == _dumps(entry)


def test_a_name_that_is_not_utf8_survives_the_manifest() -> None:
    m = Manifest(
        session_id="s",
        key="k",
        created_ns=1,
        parent=None,
        entries=[
            Entry(path=e.path, type=e.type, target=e.target, xattrs=e.xattrs) for e in ENTRIES[:12]
        ],
        packs=[],
        chunker={},
    )
    data = encode_manifest(m)
    raw = zstandard.ZstdDecompressor().decompress(data)
    # The stored text is strict UTF-8 JSON (any JSON tool reads it), the surrogate escaped.
    text = raw.decode("utf-8")
    assert "caf\\udce9" in text
    back = decode_manifest(data)
    assert [(e.path, e.target, e.xattrs) for e in back.entries] == [
        (e.path, e.target, e.xattrs) for e in m.entries
    ]
    assert os.fsencode(back.entries[5].path) == b"latin1/caf\xe9"


def _tree(root: Path) -> dict[bytes, tuple[str, bytes]]:
    """Every name below root (bytes) -> its kind and its content or link target."""
    out: dict[bytes, tuple[str, bytes]] = {}
    broot = os.fsencode(root)
    for dp, dns, fns in os.walk(broot):
        for n in dns + fns:
            p = os.path.join(dp, n)
            rel = os.path.relpath(p, broot)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir", b"")
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", f.read())
    return out


def test_checkpoint_of_names_that_are_not_utf8(tmp_path: Path) -> None:
    """Before the manifest escaped them, such a name failed every checkpoint of its
    session with a UnicodeEncodeError: a studio holding one could not be stopped with
    its data kept."""
    src = os.fsencode(tmp_path / "src")
    os.makedirs(os.path.join(src, b"r\xe9pertoire"))
    with open(os.path.join(src, b"r\xe9pertoire", b"caf\xe9.txt"), "wb") as f:
        f.write(b"latin-1 named\n")
    with open(os.path.join(src, b"\xff\xfe.bin"), "wb") as f:
        f.write(os.urandom(70_000))
    os.symlink(b"r\xe9pertoire/caf\xe9.txt", os.path.join(src, b"lien-\xe9"))
    os.link(os.path.join(src, b"\xff\xfe.bin"), os.path.join(src, b"hard-\xe9"))
    try:
        os.setxattr(os.path.join(src, b"\xff\xfe.bin"), b"user.\xe9t\xe9", b"xattr value")
        xattr = True
    except OSError:
        xattr = False  # a file system without user xattrs: the names alone are tested

    # Older than the racily-clean window, so the incremental may take them unread.
    time.sleep(2 * E._TICK_NS / 1e9)
    repo = f"file://{tmp_path / 'repo'}"
    first = E.backup_sync(repo, "s", os.fsdecode(src))
    assert first.warnings == []
    # The incremental reads the first manifest back from the store, not from memory.
    E.get_repository(repo)._manifests.clear()
    second = E.backup_sync(repo, "s", os.fsdecode(src), first.uri)
    assert second.reused_files == first.files
    assert E.verify_sync(second.uri).ok

    for uri, out in ((first.uri, tmp_path / "out1"), (second.uri, tmp_path / "out2")):
        E.restore_sync(uri, out)
        assert _tree(out) == _tree(tmp_path / "src")
        if xattr:
            got = os.getxattr(os.path.join(os.fsencode(out), b"\xff\xfe.bin"), b"user.\xe9t\xe9")
            assert got == b"xattr value"


def test_checkpoint_of_names_with_newlines(tmp_path: Path) -> None:
    """A newline or carriage return is a legal byte of a Linux file name. Such files
    were once skipped by the walk with a warning nobody saw, so a stop deleted them
    with the volume; now they are saved and restored like any other."""
    src = tmp_path / "src"
    (src / "dir\r\nwith crlf").mkdir(parents=True)
    (src / "dir\r\nwith crlf" / "inner\nfile.csv").write_bytes(b"a,b\n1,2\n")
    (src / "notes\n.txt").write_bytes(os.urandom(50_000))
    (src / "\n").write_bytes(b"just a newline\n")
    (src / "link\n").symlink_to("notes\n.txt")
    os.link(src / "notes\n.txt", src / "hard\nlink")

    repo = f"file://{tmp_path / 'repo'}"
    first = E.backup_sync(repo, "s", src)
    assert first.warnings == []
    # The three regular files were read (the hard link shares one); none was skipped.
    assert first.files == 3
    E.get_repository(repo)._manifests.clear()
    second = E.backup_sync(repo, "s", src, first.uri)
    assert E.verify_sync(second.uri).ok
    for uri, out in ((first.uri, tmp_path / "out1"), (second.uri, tmp_path / "out2")):
        E.restore_sync(uri, out)
        assert _tree(out) == _tree(src)
        assert os.readlink(out / "link\n") == "notes\n.txt"
        assert os.stat(out / "hard\nlink").st_ino == os.stat(out / "notes\n.txt").st_ino
