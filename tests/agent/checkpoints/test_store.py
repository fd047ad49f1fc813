"""The engine behind the agent's CheckpointStore interface."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agent.checkpoints import engine as E
from agent.checkpoints.content_store import ContentCheckpointStore, storage_options_for
from agent.checkpoints.legacy_archive import ArchiveCheckpointStore
from agent.checkpoints.manifest import Entry, Manifest, encode_manifest
from agent.checkpoints.store import MAX_WARNINGS, CheckpointStore


async def test_store_save_is_incremental_and_restores(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/ws/.studios/checkpoints"
    store: CheckpointStore = ContentCheckpointStore(uri)
    src = tmp_path / "upper"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(1 << 20))
    first = await store.save("sess-1", src)
    assert first.uri.startswith(uri) and first.size_bytes > 1 << 20
    (src / "b.txt").write_text("new")
    second = await store.save("sess-1", src)
    # The default parent is the session's latest checkpoint: a.bin is not read again.
    # The key is the manifest's name below the base URI.
    assert second.key.startswith("manifests/sess-1/") and second.uri == f"{uri}/{second.key}"
    m = E.get_repository(uri).load_manifest("sess-1", second.key.rsplit("/", 1)[-1])
    assert m.parent == first.uri
    out = tmp_path / "out"
    await store.restore(second.uri, out)
    assert (out / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert (out / "b.txt").read_text() == "new"


async def test_old_archive_checkpoints_still_restore(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "old.txt").write_text("from the archive days")
    old = await ArchiveCheckpointStore(str(tmp_path / "ck"), tmp_path / "tmp").save("s1", src)
    assert old.uri.endswith(".tar.gz")
    store = ContentCheckpointStore(str(tmp_path / "ck"), tmp_dir=tmp_path / "tmp")
    assert store.base_uri == f"file://{tmp_path}/ck"
    await store.restore(old.uri, tmp_path / "out")
    assert (tmp_path / "out" / "old.txt").read_text() == "from the archive days"
    # The next save is a full one in the new format (an archive is no parent).
    (tmp_path / "out" / "new.txt").write_text("n")
    new = await store.save("s1", tmp_path / "out", parent=old.uri)
    assert "/manifests/s1/" in new.uri


def test_storage_options_from_settings_and_environment() -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "STUDIOS_S3_ENDPOINT": "http://e",
    }
    assert storage_options_for("file:///x", env=env) is None
    assert storage_options_for("s3://b/x", env=env) == {
        "key": "k",
        "secret": "s",
        "endpoint_url": "http://e",
    }
    assert storage_options_for("s3://b/x", "http://flag", env=env)["endpoint_url"] == "http://flag"  # type: ignore[index]
    assert storage_options_for("s3://b/x", env={}) is None


async def test_store_save_names_what_it_left_out_in_at_most_max_warnings_lines(
    tmp_path: Path,
) -> None:
    src = tmp_path / "upper"
    src.mkdir()
    (src / "data.txt").write_text("saved")
    for i in range(MAX_WARNINGS + 5):
        os.mknod(src / f"s{i:02}.sock", 0o600 | stat.S_IFSOCK)
    saved = await ContentCheckpointStore(f"file://{tmp_path}/ck").save("sess-1", src)
    assert saved.warnings == (
        *(f"skipped 's{i:02}.sock': device node or socket" for i in range(MAX_WARNINGS)),
        "and 5 more",
    )
    out = tmp_path / "out"
    await ContentCheckpointStore(f"file://{tmp_path}/ck").restore(saved.uri, out)
    assert os.listdir(out) == ["data.txt"]


async def test_store_restore_returns_what_it_could_not_restore_as_saved(tmp_path: Path) -> None:
    # An xattr in a namespace the kernel does not know (from another system, or a
    # manifest written by hand): the file is restored, the xattr named as not restored.
    uri = f"file://{tmp_path}/ck"
    repo = E.get_repository(uri)
    entries = [Entry(".", "dir", 0o755), Entry("f", "file", xattrs={"other.ns": b"v"})]
    manifest = Manifest("s", "k1", 0, None, entries, [], {})
    repo.backend.save(repo.manifest_name("s", "k1"), encode_manifest(manifest))
    out = tmp_path / "out"
    warnings = await ContentCheckpointStore(uri).restore(repo.checkpoint_uri("s", "k1"), out)
    assert warnings == ("'f': xattr 'other.ns' not restored (Operation not supported)",)
    assert (out / "f").read_bytes() == b""
