"""`configuration.environment` (issue 13): loader and interpreter hooks and the agent's own
names are refused with a 400 naming the variable, on create, edit and start alike; nothing
is stored. The rule itself: tests/test_environment.py; the agent's own check:
tests/agent/runtime/test_local_unprivileged.py."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import ControllerHarness

REFUSED = [
    ("LD_PRELOAD", "/tmp/evil.so"),
    ("LD_LIBRARY_PATH", "/tmp"),
    ("PYTHONWARNINGS", "ignore::antigravity.x"),
    ("PYTHONSTARTUP", "/tmp/x.py"),
    ("BROWSER", "sh -c 'cat /var/lib/studios-agent/agent-token'"),
    ("PERL5OPT", "-Mevil"),
    ("NODE_OPTIONS", "--require /tmp/x.js"),
    ("BASH_ENV", "/tmp/x.sh"),
    ("GLIBC_TUNABLES", "glibc.malloc.check=3"),
    ("JUPYTER_CONFIG_DIR", "/tmp"),
    ("STUDIOS_TOOL_LABEL", "someone/else/1"),
    ("CONNECT_TOOL_PORT", "22"),
    ("HOME", "/root"),
    ("PATH", "/tmp"),
    ("ld_preload", "/tmp/evil.so"),
]


async def _create(h: ControllerHarness, **extra: object) -> dict[str, Any]:
    _, body = await h.request(
        "POST",
        "/studios?autoStart=false",
        {"name": "env studio", "computeEnvId": h.compute_env_id, **extra},
        expect=200,
    )
    studio: dict[str, Any] = body["studio"]
    return studio


@pytest.mark.parametrize(("name", "value"), REFUSED)
async def test_create_refuses_hooks_and_agent_names(
    controller_harness: ControllerHarness, name: str, value: str
) -> None:
    h = controller_harness
    status, body = await h.request(
        "POST",
        "/studios?autoStart=false",
        {
            "name": "hooked",
            "computeEnvId": h.compute_env_id,
            "configuration": {"environment": {"GREETING": "hi", name: value}},
        },
    )
    assert status == 400, body
    assert body["message"].startswith("configuration.environment: environment variable " + name)
    _, listing = await h.request("GET", "/studios", expect=200)
    assert all(s["name"] != "hooked" for s in listing["studios"])


async def test_malformed_names_and_values_are_400(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    cases = [
        ({"A=B": "x"}, "'A=B'"),
        ({"1ABC": "x"}, "'1ABC'"),
        ({"": "x"}, "''"),
        ({"BASH_FUNC_ls%%": "() { id; }"}, "BASH_FUNC_ls"),
        ({"NOTE": "two\nlines"}, "NOTE: control characters"),
        ({"NOTE": "cr\r"}, "NOTE: control characters"),
        ({"NOTE": "nul\x00"}, "NOTE: control characters"),
        ({"BIG": "x" * (32 * 1024 + 1)}, "BIG: a value is at most"),
        ({f"V{i}": "x" for i in range(257)}, "at most 256 environment variables"),
    ]
    for env, expected in cases:
        status, body = await h.request(
            "POST",
            "/studios?autoStart=false",
            {
                "name": "bad",
                "computeEnvId": h.compute_env_id,
                "configuration": {"environment": env},
            },
        )
        assert status == 400 and body["message"].startswith("configuration.environment"), body
        assert expected in body["message"], (expected, body)


async def test_edit_and_start_refuse_them_and_keep_the_stored_configuration(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    studio = await _create(h, configuration={"environment": {"GREETING": "hi"}})
    sid = studio["sessionId"]
    hooked = {"configuration": {"environment": {"GREETING": "hi", "LD_PRELOAD": "/tmp/x.so"}}}

    status, body = await h.request("PUT", f"/studios/{sid}", hooked)
    assert status == 400 and "LD_PRELOAD" in body["message"], body
    status, body = await h.request("PUT", f"/studios/{sid}/start", hooked)
    assert status == 400 and "LD_PRELOAD" in body["message"], body

    _, body = await h.request("GET", f"/studios/{sid}", expect=200)
    assert body["configuration"] == {"environment": {"GREETING": "hi"}}
    assert body["statusInfo"]["status"] == "stopped"


async def test_ordinary_variables_pass(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    env = {
        "GREETING": "hi there\twith a tab",
        "NODE_ENV": "production",
        "LANG": "de_DE.UTF-8",
        "HTTPS_PROXY": "http://proxy:3128",
        "TMPDIR": "/workspace/tmp",
        "_UNDERSCORE": "",
    }
    studio = await _create(h, configuration={"environment": env})
    assert studio["configuration"]["environment"] == env
    _, body = await h.request(
        "PUT",
        f"/studios/{studio['sessionId']}",
        {"configuration": {"environment": {**env, "MORE": "1"}}},
        expect=200,
    )
    assert body["configuration"]["environment"]["MORE"] == "1"
