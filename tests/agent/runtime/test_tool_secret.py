"""Tools believe only the proxy (issue 13): the agent starts every tool with a secret of the
session's run, its proxy adds it to every request, and the shipped templates (JupyterLab,
python-http) refuse whatever reaches their port without it. The attack: an unprivileged user
of the host (`nobody`) dials a tool's port with a forged `X-Studios-User` and opens a Jupyter
terminal, which runs as the tool's user (root, with `--local-tool-user agent` as root).

Real agent (fake controller), real tools, the agent's real connect proxy; `nobody` is a real
process switched by setpriv.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.daemon import Agent, AgentConfig, session_json
from agent.proxy import server as proxy_server
from agent.runtime import tool_guard
from agent.runtime.tool_guard import (
    NOT_FROM_PROXY,
    PROXY_SECRET_ENV,
    PROXY_SECRET_HEADER,
    proxy_refusal,
)
from agent.sessions.handle import SessionHandle, load_handles
from agent.state import StateDir
from studios_shared.connect_token import sign_connect_token
from tests import REPO_ROOT
from tests.agent_fixtures import (  # noqa: F401  (fixtures by name)
    controller_fixture,
    kill_leftover_tools,
    make_agent_config,
)
from tests.fake_controller import FakeController, desired
from tests.integration import require

RUNNING = pb.SESSION_STATUS_RUNNING
HTTP_SID = "5ec00001"
ECHO_SID = "5ec00002"
OLD_SID = "5ec00003"
JUPYTER_SID = "5ec00004"
JUPYTER = "studios/jupyterlab:4.6-0.1"
SYSTEM_PYTHON = "/usr/bin/python3"
# Tornado takes any hex string as an XSRF token (its version 1) and only compares the
# cookie with the header, so a raw client passes Jupyter's XSRF check with a pair of
# its own: the secret is the only thing that stops it.
FORGED = {"X-Studios-User": "alice", "Cookie": "_xsrf=abcd", "X-XSRFToken": "abcd"}

# Run by `nobody`: each request of a plan against the tool's port, with the forged
# headers above, and the secret (read from stdin, never in argv) where a step asks.
NOBODY_CLIENT = """
import http.client, json, os, sys
port, plan, forged = int(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
secret = sys.stdin.read().strip()
out = {"uid": os.getuid(), "answers": []}
for method, path, header in plan:
    headers = dict(forged)
    if header == "right":
        headers["X-Studios-Proxy-Secret"] = secret
    elif header == "wrong":
        headers["X-Studios-Proxy-Secret"] = "x" * len(secret)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request(method, path, body=b"" if method == "POST" else None, headers=headers)
    resp = conn.getresponse()
    out["answers"].append([resp.status, resp.read().decode("utf-8", "replace")])
    conn.close()
print(json.dumps(out))
"""


def test_the_tools_and_the_proxy_agree_on_the_header_names() -> None:
    assert tool_guard.PROXY_SECRET_HEADER == proxy_server.PROXY_SECRET_HEADER
    assert tool_guard.USER_HEADER == proxy_server.USER_HEADER


def test_a_request_is_believed_only_with_exactly_one_right_secret_and_a_user() -> None:
    s = "k" * 43
    assert proxy_refusal(s, [s], ["alice"]) == ""
    assert proxy_refusal(s, [], ["alice"]) == NOT_FROM_PROXY
    assert proxy_refusal(s, ["k" * 42], ["alice"]) == NOT_FROM_PROXY
    assert proxy_refusal(s, [s + "k"], ["alice"]) == NOT_FROM_PROXY
    # A second copy: the proxy sends one, and drops whatever a client sent.
    assert proxy_refusal(s, [s, "x"], ["alice"]) == NOT_FROM_PROXY
    assert proxy_refusal(s, [s], []) == NOT_FROM_PROXY
    assert proxy_refusal(s, [s], [" "]) == NOT_FROM_PROXY
    assert proxy_refusal(s, [s], ["alice", "mallory"]) == NOT_FROM_PROXY
    # A tool without a secret believes nobody, not everybody.
    assert proxy_refusal("", [""], ["alice"]) == NOT_FROM_PROXY
    # Whatever a client sends, no exception (compare_digest refuses non-ASCII str).
    assert proxy_refusal(s, ["\xe9\udcff"], ["alice"]) == NOT_FROM_PROXY


@pytest.mark.parametrize("module", ["agent.runtime.http_tool", "agent.runtime.jupyter_tool"])
def test_a_shipped_tool_refuses_to_start_without_the_secret(module: str, tmp_path: Path) -> None:
    if module.endswith("jupyter_tool"):
        require(importlib.util.find_spec("jupyterlab") is not None, "jupyterlab is not installed")
    env = {k: v for k, v in os.environ.items() if k != PROXY_SECRET_ENV}
    out = subprocess.run(
        [sys.executable, "-m", module, "--port", "1", "--root-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2, out
    assert f"${PROXY_SECRET_ENV} is not set" in out.stderr and "refuses to start" in out.stderr


def test_the_secret_is_taken_out_of_the_environment() -> None:
    env = {PROXY_SECRET_ENV: "s", "OTHER": "o"}
    assert tool_guard.take_proxy_secret(env) == "s" and env == {"OTHER": "o"}
    assert tool_guard.take_proxy_secret(env) == ""


# ------------------------------------------------------------ helpers


def _config(tmp_path: Path, controller: FakeController) -> AgentConfig:
    # JupyterLab takes a few seconds to start; more on a busy test host.
    return make_agent_config(tmp_path, controller, start_timeout_seconds=120.0)


@contextlib.asynccontextmanager
async def _running_agent(config: AgentConfig, controller: FakeController) -> AsyncIterator[Agent]:
    agent = Agent(config)
    await agent.start()
    await controller.wait_for(lambda: controller.messages("inventory"))
    try:
        yield agent
    finally:
        await agent.close()


def _handle(config: AgentConfig, sid: str) -> SessionHandle:
    [h] = [h for h in load_handles(StateDir(config.state_dir)) if h.session_id == sid]
    return h


def _client() -> aiohttp.ClientSession:
    # A connection per request: the proxy binds a connection to the first session it
    # serves on it, and these tests go from session to session (and port to port).
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(), connector=aiohttp.TCPConnector(force_close=True)
    )


def _cookie(key: bytes, sid: str, user: str = "alice") -> str:
    return sign_connect_token(
        key, session_id=sid, user_id=7, user_name=user, ttl_seconds=600, purpose="cookie"
    )


async def _through_proxy(
    http: aiohttp.ClientSession,
    agent: Agent,
    key: bytes,
    sid: str,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    sent = {
        "Host": f"{sid}.localhost:{agent.proxy_port}",
        "Cookie": f"studios-connect={_cookie(key, sid)}",
    }
    for name, value in (headers or {}).items():
        sent[name] = f"{sent[name]}; {value}" if name == "Cookie" else value
    async with http.request(
        method,
        f"http://127.0.0.1:{agent.proxy_port}{path}",
        headers=sent,
        data=b"" if method == "POST" else None,
        allow_redirects=False,
    ) as resp:
        return resp.status, await resp.text()


async def _direct(
    http: aiohttp.ClientSession, port: int, method: str, path: str, headers: dict[str, str]
) -> tuple[int, str]:
    async with http.request(
        method,
        f"http://127.0.0.1:{port}{path}",
        headers=headers,
        data=b"" if method == "POST" else None,
        allow_redirects=False,
    ) as resp:
        return resp.status, await resp.text()


def _as_nobody(port: int, plan: list[tuple[str, str, str]], secret: str) -> dict[str, Any]:
    """Run the plan's requests as `nobody` (only root can switch to it)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as nobody (setpriv)")
    setpriv = shutil.which("setpriv")
    require(setpriv is not None, "setpriv (util-linux) is needed to run a client as nobody")
    require(os.access(SYSTEM_PYTHON, os.X_OK), f"{SYSTEM_PYTHON} is needed (nobody runs it)")
    assert setpriv is not None
    out = subprocess.run(
        [
            setpriv,
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            SYSTEM_PYTHON,
            "-I",
            "-c",
            NOBODY_CLIENT,
            str(port),
            json.dumps(plan),
            json.dumps(FORGED),
        ],
        input=secret,
        capture_output=True,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    assert result["uid"] == pwd.getpwnam("nobody").pw_uid, result
    return result


def _assert_no_port_and_no_secret(obs: pb.SessionObserved, h: SessionHandle) -> None:
    """What users read of a session (its message and its steps) names no port and
    shows no secret; the operator's view (`studio-agent sessions`) has the port."""
    seen = [obs.message, *(s.message for s in obs.progress)]
    assert not [m for m in seen if re.search(rf"\bport\b|\b{h.port}\b", m)], seen
    assert not [m for m in seen if h.proxy_secret in m], seen
    assert obs.message.endswith("is answering"), obs.message
    operator = session_json(h)
    assert operator["toolPort"] == h.port and h.proxy_secret not in json.dumps(operator)


# ------------------------------------------------------------ python-http


async def test_python_http_believes_only_the_proxy(
    tmp_path: Path, controller: FakeController
) -> None:
    config = _config(tmp_path, controller)
    try:
        async with (
            _running_agent(config, controller) as agent,
            _client() as http,
        ):
            controller.push(desired(HTTP_SID))
            obs = await controller.wait_status(HTTP_SID, RUNNING)
            (Path(obs.root_dir) / "notes.txt").write_text("the session's own file\n")
            h = _handle(config, HTTP_SID)
            assert len(h.proxy_secret) >= 43
            _assert_no_port_and_no_secret(obs, h)

            # Straight to the port, posing as alice: refused, nothing served.
            for headers in (
                {"X-Studios-User": "alice"},
                {"X-Studios-User": "alice", PROXY_SECRET_HEADER: "x" * len(h.proxy_secret)},
                {"X-Studios-User": "alice", PROXY_SECRET_HEADER: h.proxy_secret + "x"},
            ):
                for path in ("/", "/notes.txt"):
                    status, body = await _direct(http, h.port, "GET", path, headers)
                    assert status == 403 and NOT_FROM_PROXY in body, (status, body)
                    assert "the session's own file" not in body
            # The right secret without a user is not the proxy either.
            status, _ = await _direct(
                http, h.port, "GET", "/", {PROXY_SECRET_HEADER: h.proxy_secret}
            )
            assert status == 403

            # Through the proxy with alice's cookie: the listing, and who she is.
            status, page = await _through_proxy(http, agent, controller.key, HTTP_SID, "GET", "/")
            assert status == 200 and "Directory listing for /" in page, page
            assert "Signed in as <b>alice</b>" in page and "notes.txt" in page
            # A secret the client sends is dropped by the proxy, which sends its own.
            status, text = await _through_proxy(
                http,
                agent,
                controller.key,
                HTTP_SID,
                "GET",
                "/notes.txt",
                {PROXY_SECRET_HEADER: "x" * 43},
            )
            assert status == 200 and text == "the session's own file\n"

            # As nobody: refused with and without a forged secret; the control with the
            # right secret shows that only the secret stood in the way.
            result = await asyncio.to_thread(
                _as_nobody,
                h.port,
                [
                    ("GET", "/", "none"),
                    ("GET", "/notes.txt", "wrong"),
                    ("HEAD", "/notes.txt", "none"),
                    ("GET", "/notes.txt", "right"),
                ],
                h.proxy_secret,
            )
            [no_secret, wrong, head, control] = result["answers"]
            assert no_secret[0] == wrong[0] == head[0] == 403, result
            assert NOT_FROM_PROXY in no_secret[1] and NOT_FROM_PROXY in wrong[1]
            assert control == [200, "the session's own file\n"], result
    finally:
        kill_leftover_tools(config.state_dir)


# ------------------------------------------------------------ restarts and older handles


async def test_an_agent_restarted_mid_session_keeps_the_secret_and_an_older_handle_works(
    tmp_path: Path, controller: FakeController
) -> None:
    config = _config(tmp_path, controller)
    try:
        async with _running_agent(config, controller):
            controller.push(
                desired(HTTP_SID),
                desired(ECHO_SID, image="test/echo:1"),
                desired(OLD_SID, image="test/echo:1"),
            )
            for sid in (HTTP_SID, ECHO_SID, OLD_SID):
                await controller.wait_status(sid, RUNNING)
        before = {sid: _handle(config, sid) for sid in (HTTP_SID, ECHO_SID, OLD_SID)}
        assert len({h.proxy_secret for h in before.values()}) == 3  # one per session
        for h in before.values():
            env = psutil.Process(h.pid).environ()
            assert env[PROXY_SECRET_ENV] == h.proxy_secret
        # OLD_SID plays a session an agent older than the secret started: its handle has
        # none (its tool, the echo tool, checks nothing).
        state = StateDir(config.state_dir)
        data = before[OLD_SID].to_json()
        del data["proxy_secret"]
        state.save_handle_json(OLD_SID, data)

        async with (
            _running_agent(config, controller) as agent,
            _client() as http,
        ):
            # Re-adopted, the same tools: the secrets come from handle.json.
            for sid, h in before.items():
                again = agent.manager.get(sid) if agent.manager else None
                assert again is not None and again.status == "running" and again.pid == h.pid
            assert agent.manager is not None
            assert agent.manager.get(HTTP_SID).proxy_secret == before[HTTP_SID].proxy_secret  # type: ignore[union-attr]
            assert agent.manager.get(OLD_SID).proxy_secret == ""  # type: ignore[union-attr]

            status, page = await _through_proxy(http, agent, controller.key, HTTP_SID, "GET", "/")
            assert status == 200 and "Signed in as <b>alice</b>" in page, (status, page)
            status, _ = await _direct(
                http, before[HTTP_SID].port, "GET", "/", {"X-Studios-User": "alice"}
            )
            assert status == 403

            def secrets_seen(pairs: str) -> list[str]:
                return [v for k, v in json.loads(pairs) if k.lower() == PROXY_SECRET_HEADER.lower()]

            status, pairs = await _through_proxy(
                http, agent, controller.key, ECHO_SID, "GET", "/headers"
            )
            assert status == 200 and secrets_seen(pairs) == [before[ECHO_SID].proxy_secret]
            # The older handle: proxied as before, with no secret header at all (and a
            # client's copy still dropped).
            status, pairs = await _through_proxy(
                http,
                agent,
                controller.key,
                OLD_SID,
                "GET",
                "/headers",
                {PROXY_SECRET_HEADER: "forged"},
            )
            assert status == 200 and secrets_seen(pairs) == [], pairs
    finally:
        kill_leftover_tools(config.state_dir)


# ------------------------------------------------------------ JupyterLab


async def _execute(ws: aiohttp.ClientWebSocketResponse, code: str) -> str:
    """Run `code` in the kernel (Jupyter's messaging protocol over its WebSocket)."""
    msg_id = uuid.uuid4().hex
    header = {
        "msg_id": msg_id,
        "msg_type": "execute_request",
        "username": "alice",
        "session": uuid.uuid4().hex,
        "date": "",
        "version": "5.3",
    }
    content = {"code": code, "silent": False, "store_history": False, "user_expressions": {}}
    await ws.send_str(
        json.dumps(
            {
                "header": header,
                "parent_header": {},
                "metadata": {},
                "content": {**content, "allow_stdin": False, "stop_on_error": True},
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    output, replied, idle = "", False, False
    deadline = time.monotonic() + 90
    while not (replied and idle):
        msg = await asyncio.wait_for(ws.receive(), max(0.1, deadline - time.monotonic()))
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        if data.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = data["header"]["msg_type"]
        if kind == "stream":
            output += data["content"]["text"]
        elif kind == "error":
            raise AssertionError(f"kernel error: {data['content']}")
        elif kind == "execute_reply":
            replied = True
        elif kind == "status" and data["content"]["execution_state"] == "idle":
            idle = True
    return output


async def test_jupyterlab_believes_only_the_proxy(
    tmp_path: Path, controller: FakeController
) -> None:
    require(
        importlib.util.find_spec("jupyterlab") is not None,
        "jupyterlab is not installed (pip install -e .[jupyter])",
    )
    config = _config(tmp_path, controller)
    try:
        async with (
            _running_agent(config, controller) as agent,
            _client() as http,
        ):
            d = desired(JUPYTER_SID, image=JUPYTER)
            d.spec.tool = "jupyter"
            controller.push(d)
            obs = await controller.wait_status(JUPYTER_SID, RUNNING, timeout=150)
            h = _handle(config, JUPYTER_SID)
            _assert_no_port_and_no_secret(obs, h)
            assert obs.message == "jupyter is answering"

            # Straight to the port as alice (the attack of the issue): no page, no API,
            # no terminal, no kernel, no WebSocket; the same with a wrong secret.
            wrong = {**FORGED, PROXY_SECRET_HEADER: "x" * len(h.proxy_secret)}
            for headers in (FORGED, wrong):
                for method, path in (
                    ("GET", "/lab"),
                    ("GET", "/api/status"),
                    ("GET", "/api/contents"),
                    ("POST", "/api/terminals"),
                    ("POST", "/api/kernels"),
                ):
                    status, body = await _direct(http, h.port, method, path, headers)
                    assert status == 403 and NOT_FROM_PROXY in body, (method, path, status, body)
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(
                    f"http://127.0.0.1:{h.port}/terminals/websocket/1", headers=FORGED
                )
            assert refused.value.status == 403

            # Through the proxy: alice, as Jupyter sees her.
            status, me = await _through_proxy(
                http, agent, controller.key, JUPYTER_SID, "GET", "/api/me"
            )
            assert status == 200 and json.loads(me)["identity"]["username"] == "alice", me

            # As nobody: the forged request cannot open a terminal (403, nothing
            # spawned); the control with the right secret reaches Jupyter.
            children = {p.pid for p in psutil.Process(h.pid).children(recursive=True)}
            result = await asyncio.to_thread(
                _as_nobody,
                h.port,
                [
                    ("POST", "/api/terminals", "none"),
                    ("POST", "/api/terminals", "wrong"),
                    ("GET", "/api/terminals", "none"),
                    ("GET", "/api/status", "right"),
                ],
                h.proxy_secret,
            )
            [opened, opened_wrong, listed, control] = result["answers"]
            assert opened[0] == opened_wrong[0] == listed[0] == 403, result
            assert NOT_FROM_PROXY in opened[1]
            assert control[0] == 200 and "started" in json.loads(control[1]), result
            # Nothing new under the tool (Jupyter's own helpers may come and go).
            assert {p.pid for p in psutil.Process(h.pid).children(recursive=True)} <= children

            # The session's code runs without the secret: a kernel ...
            xsrf = {"Cookie": FORGED["Cookie"], "X-XSRFToken": FORGED["X-XSRFToken"]}
            status, kernel = await _through_proxy(
                http, agent, controller.key, JUPYTER_SID, "POST", "/api/kernels", xsrf
            )
            assert status == 201, kernel
            ws = await http.ws_connect(
                f"http://127.0.0.1:{agent.proxy_port}/api/kernels/{json.loads(kernel)['id']}/channels",
                headers={
                    "Host": f"{JUPYTER_SID}.localhost:{agent.proxy_port}",
                    "Cookie": f"studios-connect={_cookie(controller.key, JUPYTER_SID)}",
                },
            )
            try:
                code = f"import os; print(repr(os.environ.get({PROXY_SECRET_ENV!r})))"
                assert (await _execute(ws, code)).strip() == "None"
            finally:
                await ws.close()
            # ... and a terminal (opened through the proxy: the same XSRF pair passes).
            status, terminal = await _through_proxy(
                http, agent, controller.key, JUPYTER_SID, "POST", "/api/terminals", xsrf
            )
            assert status == 200, terminal
            spawned = psutil.Process(h.pid).children(recursive=True)
            assert len(spawned) >= 2, spawned  # the kernel and the terminal's shell
            for proc in spawned:
                assert PROXY_SECRET_ENV not in proc.environ(), proc.cmdline()
                assert h.proxy_secret not in " ".join(proc.cmdline())
            # Nor is it on the tool's own command line, which every user can read.
            assert h.proxy_secret not in " ".join(psutil.Process(h.pid).cmdline())
    finally:
        kill_leftover_tools(config.state_dir)
