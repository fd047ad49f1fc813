"""The agent against an in-process gRPC controller: start, stop, restore, restart, reconnect."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import stat
from pathlib import Path

import psutil
import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.checkpoints import engine as E
from agent.checkpoints.manifest import Entry, Manifest, encode_manifest
from agent.daemon import Agent, AgentConfig
from agent.errors import AgentError
from studios_shared.agent_pki import format_join_token
from tests.agent_fixtures import (  # noqa: F401  (fixtures by name)
    agent_config_fixture,
    agent_fixture,
    controller_fixture,
    kill_leftover_tools,
)
from tests.fake_controller import FakeController, desired

RUNNING = pb.SESSION_STATUS_RUNNING
STARTING = pb.SESSION_STATUS_STARTING
STOPPED = pb.SESSION_STATUS_STOPPED
ERRORED = pb.SESSION_STATUS_ERRORED


def _port_answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _tools_in(root_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cwd"]):
        if proc.info["cwd"] == root_dir:
            found.append(proc)
    return found


async def test_hello_then_inventory(controller: FakeController, agent: Agent) -> None:
    first = controller.received[0][1]
    assert first.WhichOneof("message") == "hello"
    hello = first.hello
    assert hello.protocol_version == pb.PROTOCOL_VERSION_V2
    assert hello.agent_id == agent.agent_id
    assert hello.agent_id == (agent.config.state_dir / "agent-id").read_text().strip()
    assert hello.compute_env_id == "0123456789abcdef"
    assert hello.runtime_kind == pb.RUNTIME_KIND_LOCAL
    assert hello.proxy_url == f"http://localhost:{agent.proxy_port}"
    assert hello.capacity.cpus >= 1 and hello.capacity.memory_bytes > 0
    assert controller.received[1][1].WhichOneof("message") == "inventory"
    assert agent.link is not None and agent.link.connect_token_key == controller.key
    await controller.wait_for(lambda: controller.messages("heartbeat"), timeout=5)


async def test_running_only_after_the_tool_answers(
    controller: FakeController, agent: Agent
) -> None:
    controller.push(desired("aaaa0001", image="test/slow:1", environment={"SLOW_SECONDS": "1.5"}))
    obs = await controller.wait_status("aaaa0001", RUNNING)
    # The moment RUNNING is reported, the port answers.
    assert _port_answers(obs.tool_port)
    history = controller.observed("aaaa0001")
    waiting = [
        o
        for o in history
        if o.status == STARTING
        and any(
            s.name == "waiting for the tool to answer" and s.status == pb.STEP_STATUS_IN_PROGRESS
            for s in o.progress
        )
    ]
    assert waiting, "STARTING with the waiting step in progress was never reported"
    assert all(o.status in (STARTING, RUNNING) for o in history)
    assert obs.generation == 1
    assert obs.runtime == "local"
    assert obs.volume.volume_kind == pb.VOLUME_KIND_DIRECTORY
    assert obs.volume.size_bytes == 2 * 1024**3
    assert obs.root_dir == str(agent.config.state_dir / "sessions" / "aaaa0001" / "root")
    assert all(s.status == pb.STEP_STATUS_SUCCEEDED for s in obs.progress)
    handle = agent.manager.get("aaaa0001")  # type: ignore[union-attr]
    assert handle is not None and handle.pid > 0
    assert Path(handle.log_path).exists()
    env = psutil.Process(handle.pid).environ()
    assert env["CONNECT_TOOL_PORT"] == str(obs.tool_port)
    assert env["HOME"] == obs.root_dir and env["SLOW_SECONDS"] == "1.5"
    # The run's own proxy secret (secrets.token_urlsafe(32): 43 characters).
    assert len(handle.proxy_secret) >= 43 and env["CONNECT_PROXY_SECRET"] == handle.proxy_secret
    # What users read names no port, and shows no secret.
    seen = [obs.message, *(s.message for o in history for s in o.progress)]
    assert obs.message == "python-http is answering"
    assert not [m for m in seen if re.search(rf"\bport\b|\b{obs.tool_port}\b", m)], seen
    assert not [m for m in seen if handle.proxy_secret in m], seen


async def test_tool_that_exits_at_once_is_errored_with_its_status(
    controller: FakeController, agent: Agent
) -> None:
    controller.push(desired("aaaa0002", image="test/exit3:latest"))
    obs = await controller.wait_status("aaaa0002", ERRORED)
    assert "tool exited with status 3 before answering" in obs.message
    assert "port" not in obs.message.split(";")[0]
    assert "boom: config missing" in obs.message
    assert obs.exited and obs.exit_code == 3
    assert any(s.status == pb.STEP_STATUS_ERRORED for s in obs.progress)
    # Resources released; the ended generation is never restarted.
    assert not Path(obs.root_dir).exists()
    await asyncio.sleep(1.0)
    assert controller.latest("aaaa0002").status == ERRORED  # type: ignore[union-attr]
    assert not any(o.status == RUNNING for o in controller.observed("aaaa0002"))


async def test_unknown_image_errors_the_start(controller: FakeController, agent: Agent) -> None:
    controller.push(desired("aaaa0003", image="nope/missing:1"))
    obs = await controller.wait_status("aaaa0003", ERRORED)
    assert "no local template for image nope/missing:1" in obs.message


async def test_start_timeout_errors_and_releases(controller: FakeController, agent: Agent) -> None:
    agent.manager.settings.start_timeout_seconds = 1.0  # type: ignore[union-attr]
    controller.push(desired("aaaa0004", image="test/silent:1"))
    obs = await controller.wait_status("aaaa0004", ERRORED)
    assert "did not answer within 1 s" in obs.message
    handle = agent.manager.get("aaaa0004")  # type: ignore[union-attr]
    assert handle is not None
    assert not psutil.pid_exists(handle.pid) or (
        psutil.Process(handle.pid).status() == psutil.STATUS_ZOMBIE
    )
    assert not Path(obs.root_dir).exists()


async def test_stop_checkpoints_before_stopped_and_restore_brings_files_back(
    controller: FakeController, agent: Agent, tmp_path: Path
) -> None:
    base = str(tmp_path / "work" / ".studios" / "checkpoints")
    controller.push(desired("bbbb0001", checkpoint_base_uri=base))
    obs = await controller.wait_status("bbbb0001", RUNNING)
    root = Path(obs.root_dir)
    (root / "notes.txt").write_text("keep me")
    (root / "sub").mkdir()
    (root / "sub" / "data.bin").write_bytes(os.urandom(1000))

    controller.push(desired("bbbb0001", status=pb.DESIRED_STATUS_STOPPED, checkpoint_base_uri=base))
    await controller.wait_status("bbbb0001", STOPPED)
    kinds = [
        (m.WhichOneof("message"), m)
        for _, m in controller.received
        if m.WhichOneof("message") in ("checkpoint", "session")
    ]
    ckpt_index = next(
        i
        for i, (k, m) in enumerate(kinds)
        if k == "checkpoint"
        and m.checkpoint.session_id == "bbbb0001"
        and m.checkpoint.status == pb.CHECKPOINT_STATUS_FINALIZED
    )
    # The run's first checkpoint (interim) was written right after the tool answered.
    first = next(m.checkpoint for k, m in kinds if k == "checkpoint")
    assert first.status == pb.CHECKPOINT_STATUS_INTERIM and first.generation == 1
    stopped_index = next(
        i
        for i, (k, m) in enumerate(kinds)
        if k == "session" and m.session.session_id == "bbbb0001" and m.session.status == STOPPED
    )
    assert ckpt_index < stopped_index
    event = kinds[ckpt_index][1].checkpoint
    assert event.status == pb.CHECKPOINT_STATUS_FINALIZED
    assert event.generation == 1 and event.size_bytes > 0
    assert event.key.startswith("manifests/bbbb0001/")
    assert event.uri == f"file://{base}/{event.key}"
    # The manifest is the checkpoint; its data is in content-addressed packs beside it.
    assert Path(base, event.key).is_file()
    assert list(Path(base, "data").rglob("*"))
    # `stopped` is reported once the final checkpoint is recorded; the release follows in
    # the same operation and is reported again (without a volume).
    await controller.wait_for(
        lambda: (o := controller.latest("bbbb0001")) and o.status == STOPPED and not o.volume.path
    )
    assert not root.exists(), "the session directory must be released after the checkpoint"
    handle = agent.manager.get("bbbb0001")  # type: ignore[union-attr]
    assert handle is not None and not psutil.pid_exists(handle.pid)

    controller.push(
        desired("bbbb0001", generation=2, restore_uri=event.uri, checkpoint_base_uri=base)
    )
    obs2 = await controller.wait_status("bbbb0001", RUNNING, generation=2)
    assert (Path(obs2.root_dir) / "notes.txt").read_text() == "keep me"
    assert (Path(obs2.root_dir) / "sub" / "data.bin").stat().st_size == 1000
    restore_step = next(s for s in obs2.progress if s.name == "restoring the checkpoint")
    assert restore_step.status == pb.STEP_STATUS_SUCCEEDED and event.uri in restore_step.message


async def test_a_file_name_that_is_not_utf8_is_saved_at_stop_and_restored(
    controller: FakeController, agent: Agent, tmp_path: Path
) -> None:
    """A latin-1 name (a zip made on Windows) once failed every checkpoint of its
    session: the stop kept the directory unsaved, and no later start could save it."""
    base = str(tmp_path / "work" / ".studios" / "checkpoints")
    controller.push(desired("bbbb0009", checkpoint_base_uri=base))
    obs = await controller.wait_status("bbbb0009", RUNNING)
    root = os.fsencode(obs.root_dir)
    os.mkdir(os.path.join(root, b"donn\xe9es"))
    with open(os.path.join(root, b"donn\xe9es", b"caf\xe9.csv"), "wb") as f:
        f.write(b"a;b\n1;2\n")

    controller.push(desired("bbbb0009", status=pb.DESIRED_STATUS_STOPPED, checkpoint_base_uri=base))
    await controller.wait_for(
        lambda: (o := controller.latest("bbbb0009")) and o.status == STOPPED and not o.volume.path
    )
    final = [
        m.checkpoint
        for _, m in controller.received
        if m.WhichOneof("message") == "checkpoint"
        and m.checkpoint.session_id == "bbbb0009"
        and m.checkpoint.status == pb.CHECKPOINT_STATUS_FINALIZED
    ]
    assert len(final) == 1, controller.latest("bbbb0009")

    controller.push(
        desired("bbbb0009", generation=2, restore_uri=final[0].uri, checkpoint_base_uri=base)
    )
    obs2 = await controller.wait_status("bbbb0009", RUNNING, generation=2)
    restored = os.path.join(os.fsencode(obs2.root_dir), b"donn\xe9es", b"caf\xe9.csv")
    with open(restored, "rb") as f:
        assert f.read() == b"a;b\n1;2\n"


async def test_what_a_stop_leaves_out_is_named_in_its_checkpoint_step(
    controller: FakeController, agent: Agent, tmp_path: Path
) -> None:
    """A socket (a kernel's or an ssh agent's) cannot be saved: the stop says so in the
    checkpoint step's warnings, where the API shows them, and saves everything else."""
    base = str(tmp_path / "work" / ".studios" / "checkpoints")
    controller.push(desired("bbbb0010", checkpoint_base_uri=base))
    obs = await controller.wait_status("bbbb0010", RUNNING)
    root = Path(obs.root_dir)
    (root / "kept.txt").write_text("kept")
    # A socket's inode, as a bound listener leaves it (mknod: no 108-byte path limit).
    os.mknod(root / "kernel.sock", 0o600 | stat.S_IFSOCK)
    controller.push(desired("bbbb0010", status=pb.DESIRED_STATUS_STOPPED, checkpoint_base_uri=base))
    stopped = await controller.wait_for(
        lambda: (o := controller.latest("bbbb0010")) and o.status == STOPPED and o
    )
    step = next(s for s in stopped.progress if s.name == "writing the final checkpoint")
    assert step.status == pb.STEP_STATUS_SUCCEEDED
    assert list(step.warnings) == ["skipped 'kernel.sock': device node or socket"]
    out = tmp_path / "out"
    await E.restore(step.message, out)
    assert sorted(os.listdir(out)) == ["kept.txt"]


async def test_what_a_restore_could_not_restore_is_named_in_its_step(
    controller: FakeController, agent: Agent, tmp_path: Path
) -> None:
    """An xattr the kernel refuses (a namespace it does not know): the studio starts
    with its file, and the restore step's warnings say what was not restored."""
    base = f"file://{tmp_path}/work/.studios/checkpoints"
    repo = E.get_repository(base)
    entries = [Entry(".", "dir", 0o755), Entry("notes.txt", "file", xattrs={"other.ns": b"v"})]
    manifest = Manifest("bbbb0011", "k1", 0, None, entries, [], {})
    repo.backend.save(repo.manifest_name("bbbb0011", "k1"), encode_manifest(manifest))
    uri = repo.checkpoint_uri("bbbb0011", "k1")
    controller.push(desired("bbbb0011", restore_uri=uri, checkpoint_base_uri=base))
    obs = await controller.wait_status("bbbb0011", RUNNING)
    assert (Path(obs.root_dir) / "notes.txt").is_file()
    step = next(s for s in obs.progress if s.name == "restoring the checkpoint")
    assert step.status == pb.STEP_STATUS_SUCCEEDED
    assert list(step.warnings) == [
        "'notes.txt': xattr 'other.ns' not restored (Operation not supported)"
    ]


async def test_a_tool_that_dies_is_errored_and_saved(
    controller: FakeController, agent: Agent, tmp_path: Path
) -> None:
    base = str(tmp_path / "ckpt")
    controller.push(desired("cccc0001", checkpoint_base_uri=base))
    obs = await controller.wait_status("cccc0001", RUNNING)
    (Path(obs.root_dir) / "work.txt").write_text("unsaved work")
    handle = agent.manager.get("cccc0001")  # type: ignore[union-attr]
    assert handle is not None
    os.kill(handle.pid, signal.SIGKILL)
    dead = await controller.wait_status("cccc0001", ERRORED)
    assert "killed by signal SIGKILL" in dead.message
    assert dead.exited
    events = [e for e in controller.messages("checkpoint") if e.session_id == "cccc0001"]
    assert events and events[-1].status == pb.CHECKPOINT_STATUS_FINALIZED
    assert not Path(obs.root_dir).exists()
    # Never restarted: the controller still says RUNNING for generation 1.
    await asyncio.sleep(1.0)
    assert controller.latest("cccc0001").status == ERRORED  # type: ignore[union-attr]


async def test_deleted_session_is_forgotten(controller: FakeController, agent: Agent) -> None:
    controller.push(desired("dddd0001"))
    await controller.wait_status("dddd0001", RUNNING)
    controller.push(desired("dddd0001", status=pb.DESIRED_STATUS_DELETED))
    state_dir = agent.config.state_dir
    await controller.wait_for(lambda: agent.manager.get("dddd0001") is None)  # type: ignore[union-attr]
    assert not (state_dir / "sessions" / "dddd0001").exists()
    # A full desired set without a session forgets it too.
    controller.push(desired("dddd0002"))
    await controller.wait_status("dddd0002", RUNNING)
    controller.push(full=True)
    await controller.wait_for(lambda: agent.manager.get("dddd0002") is None)  # type: ignore[union-attr]
    assert not (state_dir / "sessions" / "dddd0002").exists()
    assert controller.messages("checkpoint"), (
        "a session being forgotten is stopped with a checkpoint"
    )


async def test_restart_readopts_the_running_tool_without_a_duplicate(
    controller: FakeController, agent_config: AgentConfig
) -> None:
    first = Agent(agent_config)
    await first.start()
    try:
        controller.push(desired("eeee0001"))
        obs = await controller.wait_status("eeee0001", RUNNING)
        handle = first.manager.get("eeee0001")  # type: ignore[union-attr]
        assert handle is not None
        pid = handle.pid
        await first.close()
        assert psutil.pid_exists(pid) and _port_answers(obs.tool_port), "tool must survive"

        streams_before = controller.streams
        received_before = len(controller.received)
        second = Agent(agent_config)
        await second.start()
        try:
            await controller.wait_for(lambda: controller.streams > streams_before)
            await controller.wait_for(
                lambda: any(
                    m.WhichOneof("message") == "inventory"
                    for _, m in controller.received[received_before:]
                )
            )
            inv = next(
                m.inventory
                for _, m in controller.received[received_before:]
                if m.WhichOneof("message") == "inventory"
            )
            assert [(s.session_id, s.status) for s in inv.sessions] == [("eeee0001", RUNNING)]
            await asyncio.sleep(1.0)
            later = [m for _, m in controller.received[received_before:]]
            assert not any(
                m.WhichOneof("message") == "session" and m.session.status == STARTING for m in later
            ), "no new start for a generation that is already running"
            readopted = second.manager.get("eeee0001")  # type: ignore[union-attr]
            assert readopted is not None and readopted.pid == pid
            assert len(_tools_in(obs.root_dir)) == 1

            # The re-adopted tool is still watched: it dying is noticed.
            os.kill(pid, signal.SIGTERM)
            dead = await controller.wait_status("eeee0001", ERRORED)
            assert "tool" in dead.message
        finally:
            await second.close()
    finally:
        kill_leftover_tools(agent_config.state_dir)


async def test_tool_that_died_while_the_agent_was_down(
    controller: FakeController, agent_config: AgentConfig
) -> None:
    first = Agent(agent_config)
    await first.start()
    controller.push(desired("eeee0002"))
    obs = await controller.wait_status("eeee0002", RUNNING)
    handle = first.manager.get("eeee0002")  # type: ignore[union-attr]
    assert handle is not None
    await first.close()
    os.killpg(handle.pid, signal.SIGKILL)
    await asyncio.sleep(0.3)
    second = Agent(agent_config)
    await second.start()
    try:
        dead = await controller.wait_status("eeee0002", ERRORED)
        assert "tool exited while the agent was down" in dead.message
        await controller.wait_for(lambda: not Path(obs.root_dir).exists())
    finally:
        await second.close()
        kill_leftover_tools(agent_config.state_dir)


async def test_interrupted_start_is_errored_after_restart(
    controller: FakeController, agent_config: AgentConfig
) -> None:
    first = Agent(agent_config)
    await first.start()
    controller.push(desired("eeee0003", image="test/slow:1", environment={"SLOW_SECONDS": "30"}))
    await controller.wait_for(
        lambda: (h := first.manager.get("eeee0003")) is not None and h.pid > 0  # type: ignore[union-attr]
    )
    pid = first.manager.get("eeee0003").pid  # type: ignore[union-attr]
    await first.close()
    second = Agent(agent_config)
    await second.start()
    try:
        obs = await controller.wait_status("eeee0003", ERRORED)
        assert obs.message == "agent restarted during start"
        await asyncio.sleep(0.3)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        await second.close()
        kill_leftover_tools(agent_config.state_dir)


async def test_reconnect_after_controller_restart_sends_full_inventory(
    controller: FakeController, agent: Agent
) -> None:
    controller.push(desired("ffff0001"))
    await controller.wait_status("ffff0001", RUNNING)
    port = controller.port
    await controller.stop()
    await asyncio.sleep(0.5)
    assert agent.link is not None
    await controller.wait_for(lambda: not agent.link.connected, timeout=10)  # type: ignore[union-attr]
    before = len(controller.received)
    await controller.start(port)
    await controller.wait_for(lambda: controller.streams >= 2, timeout=15)
    await controller.wait_for(
        lambda: any(m.WhichOneof("message") == "inventory" for _, m in controller.received[before:])
    )
    new = [m for _, m in controller.received[before:]]
    assert new[0].WhichOneof("message") == "hello"
    inv = next(m.inventory for m in new if m.WhichOneof("message") == "inventory")
    assert [(s.session_id, s.status) for s in inv.sessions] == [("ffff0001", RUNNING)]
    assert agent.link.connected


async def test_an_older_controller_without_acks_gets_events_resent_on_reconnect(
    controller: FakeController, agent: Agent, tmp_path: Path
) -> None:
    controller.push(desired("ffff0002", checkpoint_base_uri=str(tmp_path / "ck")))
    await controller.wait_status("ffff0002", RUNNING)
    port = controller.port
    await controller.stop()
    assert agent.link is not None
    await controller.wait_for(lambda: not agent.link.connected, timeout=10)  # type: ignore[union-attr]
    # Stopped while disconnected: the controller pushes STOPPED on reconnect.
    controller.desired["ffff0002"] = desired(
        "ffff0002", status=pb.DESIRED_STATUS_STOPPED, checkpoint_base_uri=str(tmp_path / "ck")
    )
    await controller.start(port)
    await controller.wait_status("ffff0002", STOPPED)

    def finals() -> list[pb.CheckpointEvent]:
        return [
            e
            for e in controller.messages("checkpoint")
            if e.session_id == "ffff0002" and e.status == pb.CHECKPOINT_STATUS_FINALIZED
        ]

    events = finals()
    assert len(events) == 1
    # Reconnect again: the recent event is re-sent (idempotent by key).
    await controller.stop()
    await controller.wait_for(lambda: not agent.link.connected, timeout=10)  # type: ignore[union-attr]
    await controller.start(port)
    await controller.wait_for(lambda: len(finals()) >= 2)
    again = finals()
    assert again[-1].key == events[0].key


async def test_unauthenticated_keeps_retrying_until_the_token_is_fixed(
    controller: FakeController, agent_config: AgentConfig, caplog: pytest.LogCaptureFixture
) -> None:
    # A join token for this controller's CA with a secret it does not know.
    agent_config.token_file.write_text(
        format_join_token("wrong-secret-0123456789", controller.ca.hash) + "\n"
    )
    a = Agent(agent_config)
    await a.start()
    try:
        await controller.wait_for(lambda: controller.refused >= 2, timeout=10)
        assert a.link is not None and not a.link.connected
        assert "UNAUTHENTICATED" in a.link.last_error
        assert any("refused this agent's token" in r.getMessage() for r in caplog.records)
        agent_config.token_file.write_text(controller.token + "\n")
        await controller.wait_for(lambda: controller.messages("inventory"), timeout=10)
        await controller.wait_for(lambda: a.link.connected)  # type: ignore[union-attr]
    finally:
        await a.close()


async def test_second_agent_on_the_same_state_dir_is_refused(
    agent: Agent, agent_config: AgentConfig
) -> None:
    with pytest.raises(AgentError, match="already running"):
        await Agent(agent_config).start()


async def test_a_malicious_restore_errors_the_start(
    controller: FakeController, agent: Agent, tmp_path: Path
) -> None:
    import io
    import tarfile

    # Inside the session's store (the first format's layout): the archive's own checks
    # refuse it (a restore URI outside the store never gets that far: test_restore_uri).
    base = tmp_path / "ck"
    archive = base / "abab0001" / "evil.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    controller.push(
        desired("abab0001", restore_uri=f"file://{archive}", checkpoint_base_uri=str(base))
    )
    obs = await controller.wait_status("abab0001", ERRORED)
    assert "'..'" in obs.message
    step = next(s for s in obs.progress if s.name == "restoring the checkpoint")
    assert step.status == pb.STEP_STATUS_ERRORED
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not any(o.status == RUNNING for o in controller.observed("abab0001"))


async def test_an_unusable_checkpoint_store_keeps_the_directory(
    controller: FakeController, agent: Agent
) -> None:
    controller.push(desired("abab0002", checkpoint_base_uri="nosuchscheme://bucket/x"))
    obs = await controller.wait_status("abab0002", RUNNING)
    (Path(obs.root_dir) / "precious.txt").write_text("do not lose me")
    controller.push(
        desired(
            "abab0002", status=pb.DESIRED_STATUS_STOPPED, checkpoint_base_uri="nosuchscheme://x"
        )
    )
    errored = await controller.wait_status("abab0002", ERRORED)
    assert "final checkpoint failed, the session directory is kept" in errored.message
    assert (Path(obs.root_dir) / "precious.txt").read_text() == "do not lose me"
    handle = agent.manager.get("abab0002")  # type: ignore[union-attr]
    assert handle is not None and handle.unsaved and not psutil.pid_exists(handle.pid)
