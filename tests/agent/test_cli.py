"""`studio-agent` as a real process: serve, the admin socket commands, SIGKILL and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import psutil
from studios.agent.v1 import agent_pb2 as pb

from tests.agent.serve_args import serve_args
from tests.agent_fixtures import (  # noqa: F401  (fixtures by name)
    controller_fixture,
    kill_leftover_tools,
    templates_file,
)
from tests.fake_controller import FakeController, desired

CLI = [sys.executable, "-m", "agent.cli"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _query(state_dir: Path, command: str) -> Any:
    rc, out, err = await _run(command, "--state-dir", str(state_dir), "--json")
    assert rc == 0, err
    return json.loads(out)


class Serve:
    def __init__(self, tmp_path: Path, controller: FakeController) -> None:
        self.state_dir = tmp_path / "state"
        self.token_file = tmp_path / "agent-token"
        self.token_file.write_text(controller.token)
        self.templates = templates_file(tmp_path / "templates")
        self.proxy_port = _free_port()
        self.controller = controller
        self.log = tmp_path / "agent.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *CLI,
            "serve",
            "--controller",
            self.controller.address,
            "--token-file",
            str(self.token_file),
            "--compute-env",
            "0123456789abcdef",
            "--state-dir",
            str(self.state_dir),
            "--runtime",
            "local",
            "--volume-kind",
            "directory",
            "--proxy",
            f"127.0.0.1:{self.proxy_port}",
            "--local-templates",
            str(self.templates),
            # pytest's 0700 tmp_path is out of a per-session user's reach.
            "--local-tool-user",
            "agent",
            "--stop-grace-seconds",
            "5",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=open(self.log, "ab"),
        )

    async def wait(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout=timeout)


async def test_serve_sessions_restart_and_shutdown(
    tmp_path: Path, controller: FakeController
) -> None:
    serve = Serve(tmp_path, controller)
    await serve.start()
    try:
        await controller.wait_for(lambda: controller.messages("inventory"), timeout=30)
        mode = stat.S_IMODE(os.stat(serve.state_dir / "agent.sock").st_mode)
        assert mode == 0o600

        controller.push(desired("12345678"))
        obs = await controller.wait_status("12345678", pb.SESSION_STATUS_RUNNING)

        listing = await _query(serve.state_dir, "sessions")
        [session] = listing["sessions"]
        assert session["id"] == "12345678"
        assert session["status"] == "running"
        assert session["runtime"] == "local"
        assert session["toolPort"] == obs.tool_port
        assert session["rootDir"] == str(serve.state_dir / "sessions" / "12345678" / "root")
        assert session["volume"]["kind"] == "directory"
        assert session["volume"]["path"] == session["rootDir"]
        assert session["volume"]["sizeBytes"] == 2 * 1024**3
        assert "usedBytes" in session["volume"]
        pid = session["pid"]
        assert psutil.Process(pid).cwd() == session["rootDir"]

        status = await _query(serve.state_dir, "status")
        assert status["controller"]["connected"] is True
        assert status["controller"]["address"] == controller.address
        assert status["computeEnv"] == "0123456789abcdef"
        assert status["runtime"] == "local"
        assert status["proxyUrl"] == f"http://localhost:{serve.proxy_port}"
        assert status["sessions"] == {"total": 1, "running": 1}
        assert status["capacity"]["cpus"] >= 1
        assert status["agentId"] == (serve.state_dir / "agent-id").read_text().strip()

        disk = await _query(serve.state_dir, "disk")
        assert disk["sessions"][0]["volume"]["kind"] == "directory"
        doctor = await _query(serve.state_dir, "doctor")
        runtimes = {r["name"]: r for r in doctor["runtimes"]}
        assert runtimes["local"]["usable"] and runtimes["local"]["inUse"]
        # Who runs the tools: the flag given to serve, not the default.
        assert doctor["localTools"]["toolUser"] == "agent"
        assert doctor["localTools"]["separate"] is False
        assert {v["name"] for v in doctor["volumeKinds"]} == {"directory", "xfs-loop"}

        rc, out, _ = await _run("sessions", "--state-dir", str(serve.state_dir))
        assert rc == 0 and "12345678" in out

        # SIGKILL the agent: the tool survives and the next agent re-adopts it.
        assert serve.proc is not None
        serve.proc.kill()
        await serve.wait()
        assert psutil.pid_exists(pid)
        streams = controller.streams
        received = len(controller.received)
        await serve.start()
        await controller.wait_for(lambda: controller.streams > streams, timeout=30)
        await controller.wait_for(
            lambda: any(
                m.WhichOneof("message") == "inventory" for _, m in controller.received[received:]
            )
        )
        await asyncio.sleep(1.0)
        [again] = (await _query(serve.state_dir, "sessions"))["sessions"]
        assert again["status"] == "running" and again["pid"] == pid
        new = [m for _, m in controller.received[received:]]
        assert not any(
            m.WhichOneof("message") == "session" and m.session.status == pb.SESSION_STATUS_STARTING
            for m in new
        )
        tools = [p for p in psutil.process_iter(["cwd"]) if p.info["cwd"] == again["rootDir"]]
        assert len(tools) == 1

        # SIGTERM: a clean exit that leaves the session running.
        serve.proc.send_signal(signal.SIGTERM)
        assert await serve.wait() == 0
        assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        assert "left running" in serve.log.read_text()
        assert not (serve.state_dir / "agent.sock").exists()
    finally:
        if serve.proc is not None and serve.proc.returncode is None:
            serve.proc.kill()
            await serve.wait()
        kill_leftover_tools(serve.state_dir)


async def test_unknown_runtime_is_refused_clearly(tmp_path: Path) -> None:
    rc, _, err = await _run(*serve_args(tmp_path, "--runtime", "nosuch"))
    assert rc == 2
    assert "unknown runtime 'nosuch'" in err


async def test_a_named_data_link_mounter_must_be_installed(tmp_path: Path) -> None:
    # An empty PATH: whatever this host has, the named FUSE helper cannot be found.
    empty = tmp_path / "bin"
    empty.mkdir()
    rc, _, err = await _run(
        *serve_args(tmp_path, "--proxy", "127.0.0.1:0", "--data-link-mounter", "rclone"),
        env={**os.environ, "PATH": str(empty)},
    )
    assert rc == 2
    assert "--data-link-mounter rclone: rclone not installed" in err


async def test_commands_without_a_running_agent(tmp_path: Path) -> None:
    rc, _, err = await _run("status", "--state-dir", str(tmp_path))
    assert rc == 1
    assert "not running" in err
    # doctor still answers from the CLI process, saying so.
    rc, out, err = await _run("doctor", "--state-dir", str(tmp_path), "--json")
    assert rc == 0 and "checking from this process" in err
    assert json.loads(out)["runtimes"][0]["name"] == "local"
