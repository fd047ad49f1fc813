"""A start cancelled while the restore is still downloading (issue 16: "a start cancelled
mid-restore → `stopped`, nothing left on the host").

Real processes: `studio-controller serve`, `studio-agent serve` on the local runtime with
xfs-loop volumes, the checkpoint store on S3 (SeaweedFS). Between the agent and S3 runs
`ThrottledRelay`, a test-only TCP relay that slows what S3 sends to the agent, so that
restoring a checkpoint of several packs takes seconds: the cancel arrives while packs are
still being downloaded. (tests/e2e/test_lost_agents.py cancels at a pause point after the
restore finished; this test cancels within it.)

Checked: the studio ends `stopped` ("start cancelled") much sooner than the restore takes
when let run; no tool, mount, loop device or volume of it remains; the checkpoint in the
store is untouched (every object of the bucket as before) and a later start restores it
byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import s3_server as _s3
from tests.agent.sessions.test_crash_at_every_step import _release_leftovers, _require_xfs, _tree
from tests.e2e.test_lost_agents import AGENT_ARGS, TEMPLATE, leftovers, root_dir
from tests.e2e_harness import AgentProcess, ControllerProcess, RestClient
from tests.s3_server import S3Server

pytestmark = [pytest.mark.e2e, pytest.mark.root]

s3_server = _s3.s3_server

# Three waves of packs (16 MiB each) for the restore's four download threads: a cancel
# waits for the packs in flight, at most one wave.
CHECKPOINT_BYTES = 192 * 1024 * 1024
# What S3 sends to each of the agent's connections, per second, while slowed: a pack in
# about 2.5 s, the whole restore in about 8 s.
SLOW_BYTES_PER_SECOND = 6.4 * 1024 * 1024


class ThrottledRelay:
    """Test only: a TCP relay in front of the S3 server. What the server sends is paced
    to `rate` bytes a second per connection while `slow` is set; requests pass as they
    come."""

    def __init__(self, upstream_port: int, rate: float) -> None:
        self.upstream_port = upstream_port
        self.rate = rate
        self.slow = False
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, up_writer, paced=False),
            self._pipe(up_reader, writer, paced=True),
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, paced: bool
    ) -> None:
        try:
            while data := await reader.read(64 * 1024):
                writer.write(data)
                await writer.drain()
                if paced and self.slow:
                    await asyncio.sleep(len(data) / self.rate)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()


def _objects(srv: S3Server, prefix: str) -> dict[str, Any]:
    import s3fs

    fs = s3fs.S3FileSystem(
        key=srv.key,
        secret=srv.secret,
        client_kwargs={"endpoint_url": srv.endpoint},
        skip_instance_cache=True,
    )
    return {
        path: (info["size"], info.get("ETag"))
        for path, info in fs.find(prefix, detail=True).items()
    }


@contextlib.asynccontextmanager
async def _relay(srv: S3Server) -> AsyncIterator[ThrottledRelay]:
    relay = ThrottledRelay(srv.s3_port, SLOW_BYTES_PER_SECOND)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()


async def _restore_step(api: RestClient, sid: str) -> dict[str, Any]:
    _, studio = await api.request("GET", f"/studios/{sid}", expect=200)
    steps = [s for s in studio["progress"] if s["message"].startswith("restoring")]
    return steps[0] if steps else {}


@dataclass
class SlowRestore:
    """A stopped studio whose start restores a large checkpoint through the relay."""

    api: RestClient
    agent: AgentProcess
    relay: ThrottledRelay
    bucket: str
    sid: str
    expected: dict[str, str]
    stored: dict[str, Any]

    async def start_restoring(self) -> None:
        """Start the studio slowly and return once its restore is downloading."""
        self.relay.slow = True
        await self.api.request("PUT", f"/studios/{self.sid}/start", {}, expect=200)
        deadline = time.monotonic() + 120
        while (await _restore_step(self.api, self.sid)).get("status") != "in-progress":
            assert time.monotonic() < deadline, "the restore did not begin"
            await asyncio.sleep(0.1)
        # Into the first wave of packs: the volume exists, its files are being filled.
        await asyncio.sleep(1.0)
        assert leftovers(self.agent, self.sid), "the start made nothing yet"


@contextlib.asynccontextmanager
async def _slow_restore(tmp_path: Path, s3_server: S3Server) -> AsyncIterator[SlowRestore]:
    _require_xfs()
    bucket = s3_server.make_bucket(f"cancel-{os.urandom(4).hex()}")
    keys = {"AWS_ACCESS_KEY_ID": s3_server.key, "AWS_SECRET_ACCESS_KEY": s3_server.secret}
    controller = ControllerProcess(
        tmp_path / "controller",
        env={**keys, "STUDIOS_S3_ENDPOINT": s3_server.endpoint},
        extra_args=["--reconcile-interval-seconds", "0.5"],
    )
    agent: AgentProcess | None = None
    sid = ""
    api: RestClient | None = None
    async with _relay(s3_server) as relay:
        try:
            controller.start()
            await controller.wait_ready()
            api = RestClient(controller.url, controller.admin_token)
            env_id = await api.create_compute_env("s3", f"s3://{bucket}/work")
            agent = AgentProcess(
                controller,
                env_id,
                tmp_path / "agent",
                extra_args=[*AGENT_ARGS, "--s3-endpoint", relay.endpoint],
                env=keys,
            )
            agent.start()
            _, body = await api.request(
                "POST",
                "/studios?autoStart=true",
                {"name": "big", "computeEnvId": env_id, "dataStudioToolUrl": TEMPLATE},
                expect=200,
            )
            sid = str(body["studio"]["sessionId"])
            await api.wait_status(sid, "running", timeout=120)
            work = root_dir(agent, sid) / "work"
            work.mkdir(exist_ok=True)
            for i in range(CHECKPOINT_BYTES // (16 << 20)):
                (work / f"part{i:02d}.bin").write_bytes(os.urandom(16 << 20))
            expected = _tree(work)
            await api.request("PUT", f"/studios/{sid}/stop", {}, expect=200)
            await api.wait_status(sid, "stopped", timeout=300)
            stored = _objects(s3_server, f"{bucket}/work")
            assert any("/data/" in p for p in stored), stored
            yield SlowRestore(api, agent, relay, bucket, sid, expected, stored)
        finally:
            relay.slow = False
            if api is not None:
                await api.close()
            if agent is not None:
                agent.stop()
            controller.stop()
            if agent is not None and sid:
                _release_leftovers(agent.state_dir, sid)


async def test_start_cancelled_while_restoring_stops_at_once(
    tmp_path: Path, s3_server: S3Server
) -> None:
    async with _slow_restore(tmp_path, s3_server) as run:
        api, agent, sid = run.api, run.agent, run.sid
        await run.start_restoring()
        cancelled_at = time.monotonic()
        _, cancel = await api.request("POST", f"/studios/{sid}/cancel", expect=200)
        assert cancel["statusInfo"]["status"] == "stopping"
        studio = await api.wait_status(sid, {"stopped", "errored", "running"}, timeout=60)
        cancel_seconds = time.monotonic() - cancelled_at
        assert studio["statusInfo"]["status"] == "stopped", studio["statusInfo"]
        [entry] = [s for s in agent.cli("sessions")["sessions"] if s["id"] == sid]
        assert entry["status"] == "stopped" and entry["message"] == "start cancelled", entry
        assert "restore cancelled after" in agent.log_tail(400), agent.log_tail(50)
        assert leftovers(agent, sid) == []
        # Nothing written to the store by the cancelled start, nothing removed.
        assert _objects(s3_server, f"{run.bucket}/work") == run.stored

        # The same restore let run, as slow: the cancel did not wait for it.
        started_at = time.monotonic()
        await api.request("PUT", f"/studios/{sid}/start", {}, expect=200)
        await api.wait_status(sid, "running", timeout=180)
        full_seconds = time.monotonic() - started_at
        print(f"cancel took {cancel_seconds:.1f} s; the full start {full_seconds:.1f} s")
        assert cancel_seconds < full_seconds / 2, (cancel_seconds, full_seconds)
        run.relay.slow = False
        assert _tree(root_dir(agent, sid) / "work") == run.expected
        await api.request("PUT", f"/studios/{sid}/stop", {}, expect=200)
        await api.wait_status(sid, "stopped", timeout=300)


async def test_agent_stopped_while_restoring_exits_at_once(
    tmp_path: Path, s3_server: S3Server
) -> None:
    """SIGTERM mid-restore: the agent's exit waited for its worker threads, so for the
    whole restore; now it ends the restore, and the next agent process aborts the start
    (nothing left) and the studio starts again from the untouched checkpoint."""
    async with _slow_restore(tmp_path, s3_server) as run:
        api, agent, sid = run.api, run.agent, run.sid
        await run.start_restoring()
        stopped_at = time.monotonic()
        code = await asyncio.to_thread(agent.stop, signal.SIGTERM, 60.0)
        stop_seconds = time.monotonic() - stopped_at
        assert code == 0, (code, agent.log_tail())
        assert _objects(s3_server, f"{run.bucket}/work") == run.stored

        # The next agent process finds the start interrupted and aborts it; the studio,
        # still wanted running, starts again and restores the checkpoint whole, as slowly.
        started_at = time.monotonic()
        agent.start()
        studio = await api.wait_status(sid, {"running", "errored", "stopped"}, timeout=180)
        if studio["statusInfo"]["status"] != "running":
            await api.request("PUT", f"/studios/{sid}/start", {}, expect=200)
            await api.wait_status(sid, "running", timeout=180)
        full_seconds = time.monotonic() - started_at
        print(
            f"the agent stopped in {stop_seconds:.1f} s; its next start took {full_seconds:.1f} s"
        )
        assert stop_seconds < full_seconds / 2, (stop_seconds, full_seconds)
        run.relay.slow = False
        assert _tree(root_dir(agent, sid) / "work") == run.expected
        await api.request("PUT", f"/studios/{sid}/stop", {}, expect=200)
        await api.wait_status(sid, "stopped", timeout=300)
