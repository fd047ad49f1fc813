"""The local runtime without root (issue 13): an agent running as root gives each session's
tool a uid of its own, a clean environment and a 0700 session root; a studio's environment
cannot hook the loader or an interpreter, nor override the agent's own variables.

Real agent, real tools (the system's /usr/bin/python3: the test venv's interpreter may lie
where other users cannot reach), real restores. The state and the tool scripts live in a
directory of /tmp that other users can pass through, not in pytest's 0700 tmp_path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import Agent
from agent.errors import RuntimeStartError
from agent.host import doctor_report
from agent.runtime import StartSpec
from agent.runtime.base import SESSION_UIDS
from agent.runtime.local import switch_user_argv
from agent.sessions.handle import SessionHandle, load_handles
from agent.state import StateDir
from tests.agent_fixtures import (  # noqa: F401  (fixtures by name)
    controller_fixture,
    kill_leftover_tools,
    make_agent_config,
)
from tests.fake_controller import FakeController, desired

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (per-session uids)")

RUNNING = pb.SESSION_STATUS_RUNNING
STOPPED = pb.SESSION_STATUS_STOPPED
ERRORED = pb.SESSION_STATUS_ERRORED
SYSTEM_PYTHON = "/usr/bin/python3"
FIRST_UID, UID_COUNT = SESSION_UIDS
CANARY = "STUDIOS_TEST_CANARY_0a1b2c"

# Writes a note into its home once, leaves a process running in a session of its own
# (outside its process group: stopping the group does not end it), then serves HTTP.
WHO_TOOL = """
import http.server, os, sys, time
home = os.environ["HOME"]
note = os.path.join(home, "note.txt")
if not os.path.exists(note):
    with open(note, "w") as f:
        f.write("written by uid %d" % os.getuid())
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(600)
    os._exit(0)
os.wait()
os.chdir(home)
port = int(os.environ["CONNECT_TOOL_PORT"])
http.server.ThreadingHTTPServer(
    ("127.0.0.1", port), http.server.SimpleHTTPRequestHandler
).serve_forever()
"""


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory other users may pass through (0711), removed afterwards."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is needed (an interpreter every user can run)")
    base = Path(tempfile.mkdtemp(prefix="studios-unpriv-", dir="/tmp"))
    os.chmod(base, 0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _templates(base: Path) -> Path:
    tools = base / "tools"
    tools.mkdir(mode=0o755)
    os.chmod(tools, 0o755)
    script = tools / "who_tool.py"
    script.write_text(textwrap.dedent(WHO_TOOL))
    os.chmod(script, 0o644)
    table = {"test/who": {"command": [SYSTEM_PYTHON, str(script)], "tool": "who"}}
    path = tools / "templates.json"
    path.write_text(json.dumps(table))
    return path


@pytest.fixture
async def session_agent(
    tmp_path: Path,
    reachable_dir: Path,
    controller: FakeController,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Agent]:
    """An agent as root with per-session tool users, and secrets in its environment."""
    monkeypatch.setenv(CANARY, "the agent's own variable")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAAGENTSOWNKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "the checkpoint store's secret")
    config = make_agent_config(
        tmp_path,
        controller,
        state_dir=reachable_dir / "state",
        local_templates=_templates(reachable_dir),
        local_tool_user="session",
        checkpoint_interval_seconds=3600.0,
    )
    a = Agent(config)
    await a.start()
    await controller.wait_for(lambda: controller.messages("inventory"))
    try:
        yield a
    finally:
        await a.close()
        uids = {_uid_of(h) for h in load_handles(StateDir(config.state_dir))}
        kill_leftover_tools(config.state_dir)
        for proc in psutil.process_iter(["uids"]):
            if proc.info["uids"] and proc.info["uids"].real in uids:
                with contextlib.suppress(psutil.Error):
                    proc.kill()


def _uid_of(h: SessionHandle) -> int:
    return int(h.runtime_data.get("uid", -1))


def _handle(agent: Agent, sid: str) -> SessionHandle:
    [h] = [h for h in load_handles(StateDir(agent.config.state_dir)) if h.session_id == sid]
    return h


def _status_ids(pid: int) -> dict[str, list[int]]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(v) for v in value.split()]
    return out


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = [item.decode().partition("=") for item in raw.split(b"\0") if item]
    return {k: v for k, _, v in pairs}


def _as_uid(uid: int, code: str) -> subprocess.CompletedProcess[str]:
    # Not subprocess's user=: it forks, and gRPC's fork handlers crash the child now and then.
    return subprocess.run(
        switch_user_argv(uid, uid, [SYSTEM_PYTHON, "-c", code]),
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _processes_of(uid: int) -> list[int]:
    """Live processes of `uid` (a killed one may stay a zombie until init reaps it)."""
    return [
        p.pid
        for p in psutil.process_iter(["uids", "status"])
        if p.info["uids"]
        and uid in (p.info["uids"].real, p.info["uids"].effective)
        and p.info["status"] != psutil.STATUS_ZOMBIE
    ]


async def test_tool_runs_as_its_own_uid_with_a_clean_environment(
    controller: FakeController, session_agent: Agent
) -> None:
    controller.push(desired("a0a00001", image="test/who:1", environment={"GREETING": "hi"}))
    controller.push(desired("b0b00002", image="test/who:1"))
    obs_a = await controller.wait_status("a0a00001", RUNNING)
    obs_b = await controller.wait_status("b0b00002", RUNNING)
    a, b = _handle(session_agent, "a0a00001"), _handle(session_agent, "b0b00002")
    uid_a, uid_b = _uid_of(a), _uid_of(b)

    # Not root, not the agent, one uid per session, from the range; gid the same number,
    # no supplementary groups (root's group 0 would stay otherwise).
    assert uid_a != uid_b
    for h, uid in ((a, uid_a), (b, uid_b)):
        assert FIRST_UID <= uid < FIRST_UID + UID_COUNT
        ids = _status_ids(h.pid)
        assert ids["Uid"] == [uid] * 4 and ids["Gid"] == [uid] * 4, ids
        assert ids["Groups"] == [], ids

    # The environment is made from nothing: none of the agent's variables (its AWS keys,
    # the canary set in the agent's process), only what the runtime sets and the studio's.
    env = _environ(a.pid)
    assert set(env) == {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "GREETING",
        "CONNECT_TOOL_PORT",
        "CONNECT_PROXY_SECRET",
        "STUDIOS_TOOL_LABEL",
    }, env
    # Its run's own secret (what the proxy proves itself to the tool with).
    assert env["CONNECT_PROXY_SECRET"] == a.proxy_secret and a.proxy_secret != b.proxy_secret
    assert CANARY not in env and not any(k.startswith("AWS_") for k in env)
    assert os.environ[CANARY] and os.environ["AWS_ACCESS_KEY_ID"]  # the agent has them
    assert env["HOME"] == obs_a.root_dir and env["GREETING"] == "hi"
    assert env["USER"] == env["LOGNAME"] == f"studios-{uid_a}"
    assert env["STUDIOS_TOOL_LABEL"] == f"{session_agent.agent_id}/a0a00001/1"
    assert "studios" not in env["PATH"].lower() or env["PATH"].startswith("/")

    # Its root is its own and closed; its session directory lets only it through.
    for obs, uid in ((obs_a, uid_a), (obs_b, uid_b)):
        root = Path(obs.root_dir)
        st = os.stat(root)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, uid, 0o700)
        st = os.stat(root.parent)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, uid, 0o710)
        note = root / "note.txt"
        assert note.read_text() == f"written by uid {uid}"
        assert os.stat(note).st_uid == uid

    # Session A's user reads its own note, not B's; B's neither A's.
    note_a = Path(obs_a.root_dir) / "note.txt"
    note_b = Path(obs_b.root_dir) / "note.txt"
    ok = _as_uid(uid_a, f"print(open({str(note_a)!r}).read())")
    assert ok.returncode == 0 and f"uid {uid_a}" in ok.stdout, ok.stderr
    for uid, path in ((uid_a, note_b), (uid_b, note_a)):
        denied = _as_uid(uid, f"open({str(path)!r}).read()")
        assert denied.returncode != 0 and "PermissionError" in denied.stderr, denied
        listing = _as_uid(uid, f"import os; os.listdir({str(path.parent.parent)!r})")
        assert listing.returncode != 0 and "PermissionError" in listing.stderr, listing
    # Nor the agent's handles, logs and state: the sessions directory is search-only.
    sessions = Path(obs_a.root_dir).parent.parent
    listing = _as_uid(uid_a, f"import os; os.listdir({str(sessions)!r})")
    assert listing.returncode != 0 and "PermissionError" in listing.stderr, listing

    # The tool left a process outside its group: stopping the session ends it too.
    assert len(_processes_of(uid_a)) >= 2
    controller.push(desired("a0a00001", status=pb.DESIRED_STATUS_STOPPED))
    await controller.wait_status("a0a00001", STOPPED)
    assert _processes_of(uid_a) == []
    assert _processes_of(uid_b)  # B still runs


async def test_restored_files_belong_to_the_new_sessions_uid(
    controller: FakeController, session_agent: Agent, reachable_dir: Path
) -> None:
    """A checkpoint's files (the tool's, as its uid) are restored, for this session and for
    a clone in another session, and each time belong to the session's tool user; set-id bits
    of the checkpoint do not survive the hand-over."""
    base = f"file://{reachable_dir}/store"
    controller.push(desired("c0c00003", image="test/who:1", checkpoint_base_uri=base))
    obs = await controller.wait_status("c0c00003", RUNNING)
    uid_c = _uid_of(_handle(session_agent, "c0c00003"))
    root = Path(obs.root_dir)
    made = _as_uid(
        uid_c,
        "import os\n"
        f"os.makedirs({str(root / 'work/deep')!r})\n"
        f"open({str(root / 'work/deep/data.txt')!r}, 'w').write('payload')\n"
        f"open({str(root / 'work/tool')!r}, 'w').write('#!/bin/sh')\n"
        f"os.chmod({str(root / 'work/tool')!r}, 0o6755)\n"
        f"os.symlink('deep/data.txt', {str(root / 'work/link')!r})\n",
    )
    assert made.returncode == 0, made.stderr
    controller.push(desired("c0c00003", status=pb.DESIRED_STATUS_STOPPED, checkpoint_base_uri=base))
    await controller.wait_status("c0c00003", STOPPED)
    final = [
        e.uri
        for e in controller.messages("checkpoint")
        if e.session_id == "c0c00003" and e.status == pb.CHECKPOINT_STATUS_FINALIZED
    ][-1]

    # The same session again, and a clone in another session (another uid).
    controller.push(
        desired(
            "c0c00003",
            generation=2,
            image="test/who:1",
            restore_uri=final,
            checkpoint_base_uri=base,
        )
    )
    controller.push(
        desired("d0d00004", image="test/who:1", restore_uri=final, checkpoint_base_uri=base)
    )
    again = await controller.wait_status("c0c00003", RUNNING, generation=2)
    clone = await controller.wait_status("d0d00004", RUNNING)
    uid_again = _uid_of(_handle(session_agent, "c0c00003"))
    uid_clone = _uid_of(_handle(session_agent, "d0d00004"))
    assert uid_clone not in (uid_again, 0)
    for obs2, uid in ((again, uid_again), (clone, uid_clone)):
        root2 = Path(obs2.root_dir)
        for rel in ("", "work", "work/deep", "work/deep/data.txt", "work/tool", "work/link"):
            st = os.lstat(root2 / rel)
            assert (st.st_uid, st.st_gid) == (uid, uid), (rel, st)
        assert not os.stat(root2 / "work/tool").st_mode & (stat.S_ISUID | stat.S_ISGID)
        # The restored note keeps what the first tool wrote; the new uid may read and write.
        read = _as_uid(
            uid,
            f"print(open({str(root2 / 'work/link')!r}).read());"
            f"open({str(root2 / 'work/deep/data.txt')!r}, 'a').write('+')",
        )
        assert read.returncode == 0 and read.stdout.strip() == "payload", read.stderr
        assert (root2 / "note.txt").read_text() == f"written by uid {uid_c}"
    # The clone's user cannot read the original's restored files, nor the other way round.
    denied = _as_uid(uid_clone, f"open({str(Path(again.root_dir) / 'work/deep/data.txt')!r})")
    assert denied.returncode != 0 and "PermissionError" in denied.stderr


async def test_agent_refuses_a_hooked_environment_whatever_the_controller_says(
    controller: FakeController, session_agent: Agent
) -> None:
    for sid, name in (("e0e00005", "LD_PRELOAD"), ("e0e00006", "PYTHONWARNINGS")):
        controller.push(desired(sid, image="test/who:1", environment={"GREETING": "hi", name: "x"}))
        obs = await controller.wait_status(sid, ERRORED)
        assert name in obs.message and "not allowed" in obs.message, obs.message
        h = _handle(session_agent, sid)
        assert not h.pid
        assert not Path(h.root_dir).exists()
    # The agent's own names too (a desired state may say anything).
    controller.push(
        desired("e0e00007", image="test/who:1", environment={"STUDIOS_TOOL_LABEL": "x/y/1"})
    )
    obs = await controller.wait_status("e0e00007", ERRORED)
    assert "STUDIOS_TOOL_LABEL" in obs.message


def test_start_spec_refuses_for_every_runtime(tmp_path: Path) -> None:
    for name in ("LD_PRELOAD", "BROWSER", "CONNECT_TOOL_PORT", "HOME"):
        with pytest.raises(RuntimeStartError, match=name):
            StartSpec("s1", "img", "tool", {name: "x"}, tmp_path, tmp_path / "log", 1)
    StartSpec("s1", "img", "tool", {"GREETING": "hi"}, tmp_path, tmp_path / "log", 1)


def test_doctor_says_who_runs_tools() -> None:
    report = doctor_report(None)
    local = next(r for r in report["runtimes"] if r["name"] == "local")
    assert report["localTools"]["separate"] is True
    assert "a user of their own per session" in local["reason"]
    report = doctor_report(None, local_tool_user="agent")
    assert report["localTools"]["separate"] is False
    assert "tools run as root" in report["localTools"]["reason"]
