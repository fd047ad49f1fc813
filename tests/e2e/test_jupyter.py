"""JupyterLab through the connect proxy, end to end, by two users at once.

The real controller and agent run as processes (tests/e2e_harness.py); the studio uses
the `studios/jupyterlab` template of the local runtime. Two users of the workspace open
its studioUrl each with their own cookie jar, use Jupyter's REST API and run code in a
kernel over its WebSocket (the Jupyter messaging protocol), and are both listed in
`activeConnections`; a third user below the connect role is refused by the controller,
and a forged or absent cookie by the proxy.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from studios_shared.connect_token import sign_connect_token
from tests.e2e_harness import LocalStack, RestClient
from tests.integration import require

pytestmark = pytest.mark.e2e

TEMPLATE = "studios/jupyterlab:4.6-0.1"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[LocalStack]:
    require(
        importlib.util.find_spec("jupyterlab") is not None,
        "jupyterlab is not installed (pip install -e .[jupyter])",
    )
    async with LocalStack(tmp_path) as s:
        yield s


class JupyterUser:
    """One browser-like client: its own cookie jar, signed in through studioUrl."""

    def __init__(self, api: RestClient) -> None:
        self.api = api
        self.base = ""

    @property
    def http(self) -> aiohttp.ClientSession:
        return self.api.http

    async def open(self, studio: dict[str, Any]) -> str:
        async with self.http.get(
            studio["studioUrl"],
            headers={"Authorization": f"Bearer {self.api.token}"},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 302, await resp.text()
            location = resp.headers["Location"]
        # token -> cookie -> clean URL -> Jupyter's own redirect to /lab
        async with self.http.get(location) as resp:
            assert resp.status == 200, await resp.text()
            page = await resp.text()
            assert resp.url.path.startswith("/lab"), resp.url
            self.base = f"{resp.url.scheme}://{resp.url.host}:{resp.url.port}"
        return page

    def xsrf(self) -> str:
        for cookie in self.http.cookie_jar:
            if cookie.key == "_xsrf":
                return cookie.value
        raise AssertionError("JupyterLab set no _xsrf cookie")

    async def rest(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"X-XSRFToken": self.xsrf()} if method != "GET" else {}
        async with self.http.request(method, self.base + path, json=body, headers=headers) as resp:
            text = await resp.text()
            if text and resp.content_type == "application/json":
                return resp.status, json.loads(text)
            return resp.status, text

    async def execute(self, ws: aiohttp.ClientWebSocketResponse, code: str) -> str:
        """Run `code` in the kernel: execute_request on shell, output from iopub."""
        msg_id = uuid.uuid4().hex
        await ws.send_str(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "msg_type": "execute_request",
                        "username": "test",
                        "session": uuid.uuid4().hex,
                        "date": "",
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": True,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": True,
                    },
                    "channel": "shell",
                    "buffers": [],
                }
            )
        )
        output, replied, idle = "", False, False
        deadline = time.monotonic() + 60
        while not (replied and idle):
            msg = await asyncio.wait_for(ws.receive(), max(0.1, deadline - time.monotonic()))
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            data = json.loads(msg.data)
            if data.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = data["header"]["msg_type"], data["content"]
            if kind == "stream":
                output += content["text"]
            elif kind == "execute_result":
                output += content["data"]["text/plain"]
            elif kind == "error":
                raise AssertionError(f"kernel error: {content}")
            elif kind == "execute_reply":
                assert content["status"] == "ok", content
                replied = True
            elif kind == "status" and content["execution_state"] == "idle":
                idle = True
        return output


async def test_two_users_drive_jupyterlab_through_the_proxy(stack: LocalStack) -> None:
    admin = stack.api
    assert admin is not None
    tokens = {
        name: await asyncio.to_thread(stack.controller.add_user, name, role)
        for name, role in (("alice", "connect"), ("bob", "maintain"), ("carol", "view"))
    }
    _, body = await admin.request(
        "POST",
        "/studios",
        {
            "name": "jupyter",
            "computeEnvId": stack.compute_env_id,
            "dataStudioToolUrl": TEMPLATE,
        },
        expect=200,
    )
    sid = body["studio"]["sessionId"]
    studio = await admin.wait_status(sid, {"running", "errored"}, timeout=120)
    assert studio["statusInfo"]["status"] == "running", studio

    clients = {name: RestClient(stack.controller.url, tokens[name]) for name in tokens}
    try:
        users = {name: JupyterUser(clients[name]) for name in ("alice", "bob")}
        sockets = {}
        for name, user in users.items():
            assert "JupyterLab" in await user.open(studio)
            status, info = await user.rest("GET", "/api/status")
            assert status == 200 and "started" in info, info
            # Jupyter knows who is who from the proxy's header.
            status, me = await user.rest("GET", "/api/me")
            assert status == 200 and me["identity"]["username"] == name, me
            status, kernel = await user.rest("POST", "/api/kernels", {"name": "python3"})
            assert status == 201, kernel
            ws_url = user.base.replace("http", "ws", 1) + f"/api/kernels/{kernel['id']}/channels"
            sockets[name] = await user.http.ws_connect(ws_url)
            assert (await user.execute(sockets[name], "print(6*7)")).strip() == "42"

        # Both at once: each kernel still answers while the other user is connected.
        results = await asyncio.gather(
            users["alice"].execute(sockets["alice"], "6*7"),
            users["bob"].execute(sockets["bob"], "print('bob', 6*7)"),
        )
        assert results[0].strip() == "42" and results[1].strip() == "bob 42"

        wanted: set[str] = {"alice", "bob"}
        deadline = time.monotonic() + 20
        while True:
            _, detail = await admin.request("GET", f"/studios/{sid}", expect=200)
            listed = {c["userName"] for c in detail["activeConnections"]}
            if wanted <= listed:
                break
            assert time.monotonic() < deadline, detail["activeConnections"]
            await asyncio.sleep(0.2)
        assert all(c["email"].endswith("@example.org") for c in detail["activeConnections"])

        # Carol (view role) is refused by the controller ...
        carol = clients["carol"]
        async with carol.http.get(
            studio["studioUrl"],
            headers={"Authorization": f"Bearer {carol.token}"},
            allow_redirects=False,
        ) as resp:
            assert resp.status in (403, 404), await resp.text()
        # ... and the proxy lets in neither no cookie nor a forged one.
        base = users["alice"].base
        async with carol.http.get(f"{base}/api/status") as resp:
            assert resp.status == 401, await resp.text()
        forged = sign_connect_token(
            b"f" * 32,
            session_id=sid,
            user_id=999,
            user_name="carol",
            ttl_seconds=600,
            purpose="cookie",
        )
        async with carol.http.get(
            f"{base}/api/status", headers={"Cookie": f"studios-connect={forged}"}
        ) as resp:
            assert resp.status == 401, await resp.text()
        assert "carol" not in {c["userName"] for c in detail["activeConnections"]}

        # Bob's role drops below connect: the controller narrows the session's access,
        # the proxy ends his kernel WebSocket within seconds and refuses his cookie;
        # Alice keeps working.
        _, me = await clients["bob"].request("GET", "/user-info", expect=200)
        bob_id = me.get("user", me)["id"]
        _, listing = await admin.request("GET", "/orgs/1/workspaces/1/participants", expect=200)
        (participant,) = [p for p in listing["participants"] if p.get("memberId") == bob_id]
        started = time.monotonic()
        await admin.request(
            "PUT",
            f"/orgs/1/workspaces/1/participants/{participant['participantId']}/role",
            {"role": "view"},
            expect=204,
        )
        msg = await asyncio.wait_for(sockets["bob"].receive(), 10)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
        assert time.monotonic() - started < 10
        status, refused = await users["bob"].rest("GET", "/api/status")
        assert status == 403 and "no longer use" in refused, refused
        assert (await users["alice"].execute(sockets["alice"], "print(7*6)")).strip() == "42"

        for sock in sockets.values():
            await sock.close()
    finally:
        for client in clients.values():
            await client.close()


def test_without_jupyterlab_the_tool_exits_naming_the_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.runtime import jupyter_tool

    real = importlib.util.find_spec
    # The module object jupyter_tool calls find_spec on (`importlib.util`, imported there).
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "jupyterlab" else real(name, *a),
    )
    assert jupyter_tool.main(["--port", "1", "--root-dir", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "needs the Python package 'jupyterlab'" in err and "pip install" in err
