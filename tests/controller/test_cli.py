"""`studio-controller` as a process: bootstrap, `user add`, clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import ControllerHarness


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_bootstrap_files_and_modes(controller_harness: ControllerHarness) -> None:
    data = controller_harness.data_dir
    for name in ("admin-token", "agent-token", "connect-key"):
        path = data / name
        assert path.exists(), name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
        assert path.read_text().strip() == path.read_text(), "no trailing newline"
    assert len(bytes.fromhex((data / "connect-key").read_text())) == 32
    assert (data / "studios.db").exists()
    assert controller_harness.admin_token != controller_harness.agent_token


async def test_restart_with_missing_token_file_keeps_the_admin(tmp_path: Path) -> None:
    harness = ControllerHarness(tmp_path / "data")
    await harness.start(with_compute_env=False)
    token = harness.admin_token
    await harness.close()
    (harness.data_dir / "admin-token").unlink()
    again = ControllerHarness(tmp_path / "data")
    await again.start(with_compute_env=False)
    try:
        assert not (again.data_dir / "admin-token").exists()
        status, _ = await again.request("GET", "/studios", token=token)
        assert status == 200
    finally:
        await again.close()


async def test_user_add_prints_a_working_token(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    # In a thread: the controller in this event loop must be able to finish
    # the transaction it may have open (SQLite's write lock) meanwhile.
    result = await asyncio.to_thread(
        _cli,
        "user",
        "add",
        "--data-dir",
        str(h.data_dir),
        "--name",
        "alice",
        "--email",
        "alice@example.org",
        "--role",
        "maintain",
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token and "\n" not in token
    _, body = await h.request("GET", "/user-info", token=token, expect=200)
    assert body["user"]["userName"] == "alice"
    _, body = await h.request(
        "POST",
        "/studios?autoStart=false",
        {"name": "alice's", "computeEnvId": h.compute_env_id},
        token=token,
        expect=200,
    )
    assert body["studio"]["user"]["userName"] == "alice"
    again = await asyncio.to_thread(
        _cli, "user", "add", "--data-dir", str(h.data_dir), "--name", "alice", "--email", "a@b"
    )
    assert again.returncode == 1 and "already exists" in again.stderr


def test_serve_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    http_port, grpc_port = _free_port(), _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controller.cli",
            "serve",
            "--data-dir",
            str(tmp_path / "data"),
            "--http",
            f"127.0.0.1:{http_port}",
            "--grpc",
            f"127.0.0.1:{grpc_port}",
            "--grpc-agents",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/openapi.yaml") as r:
                    assert r.status == 200
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "controller did not start"
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"127.0.0.1:{http_port}" in err and f"127.0.0.1:{grpc_port}" in err
    assert "Traceback" not in err
    assert os.stat(tmp_path / "data" / "admin-token").st_size > 0
