"""The object store going away: a clear error naming the store; earlier checkpoints stay valid."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.checkpoints import engine as E
from agent.checkpoints.backend import StoreUnavailable
from tests.s3_server import S3Server, require_weed


@pytest.fixture
def private_s3(tmp_path: Path) -> Iterator[S3Server]:
    srv = S3Server(tmp_path / "weed", require_weed())
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


async def test_store_down_during_refresh(private_s3: S3Server, tmp_path: Path) -> None:
    private_s3.make_bucket("studios")
    uri = "s3://studios/env/.studios/checkpoints"
    opts = private_s3.storage_options
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(2 << 20))
    r1 = await E.backup(uri, "s", src, storage_options=opts)
    (src / "b.bin").write_bytes(os.urandom(2 << 20))

    private_s3.stop()
    t = time.monotonic()
    with pytest.raises(StoreUnavailable) as ei:
        await E.backup(uri, "s", src, r1.uri, storage_options=opts)
    # The error names the store, and giving up does not take minutes.
    assert "s3://studios/env/.studios/checkpoints" in str(ei.value)
    assert time.monotonic() - t < 60

    private_s3.start()
    assert E.latest_checkpoint(uri, "s", storage_options=opts) == r1.uri
    assert (await E.verify(r1.uri, storage_options=opts)).ok
    # Retry later: the next refresh succeeds and is incremental.
    r2 = await E.backup(uri, "s", src, r1.uri, storage_options=opts)
    assert r2.reused_files == 1
    out = tmp_path / "out"
    await E.restore(r2.uri, out, storage_options=opts)
    assert (out / "b.bin").read_bytes() == (src / "b.bin").read_bytes()


async def test_unreachable_endpoint(tmp_path: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    opts = {"key": "k", "secret": "s", "endpoint_url": f"http://127.0.0.1:{port}"}
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(StoreUnavailable, match="s3://nowhere/ckpt"):
        await E.backup("s3://nowhere/ckpt", "s", src, storage_options=opts)
