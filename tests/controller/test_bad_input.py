"""Bad input answers 4xx, never 500 (issue 13).

Deeply nested JSON (also on the unauthenticated sign-in), bodies over the limit (with and
without Content-Length), malformed JSON and text, unpaired surrogates, non-ASCII and malformed
bearer tokens (sent as raw bytes), control characters in names, descriptions and query
parameters: each is refused with the project's error shape (``{"message": ...}``, naming the
field), no stack trace, and nothing stored. Every answer the harness sees is also checked
against controller/openapi.yaml.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from controller.errors import BadRequest, PayloadTooLarge
from controller.json_body import MAX_BODY_BYTES, MAX_DEPTH, loads, nesting_depth
from tests.conftest import ControllerHarness, check_response


def _error_message(status: int, body: Any) -> str:
    assert isinstance(body, dict) and isinstance(body.get("message"), str), (status, body)
    assert "Traceback" not in body["message"] and 'File "' not in body["message"]
    return str(body["message"])


async def _raw(h: ControllerHarness, head: bytes, body: bytes = b"") -> tuple[int, bytes, bytes]:
    """(status, head, body) of one request written byte for byte."""
    assert h.controller is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", h.controller.http_port)
    try:
        writer.write(head + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    response_head, _, response_body = data.partition(b"\r\n\r\n")
    status = int(response_head.split(b" ", 2)[1])
    return status, response_head, response_body


async def _studio_names(h: ControllerHarness) -> list[str]:
    _, body = await h.request("GET", "/studios?max=1000", expect=200)
    return [s["name"] for s in body["studios"]]


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- the JSON helper on its own ---------------------------------------------------------------


def test_nesting_depth_ignores_brackets_in_strings() -> None:
    assert nesting_depth(b'{"a": "[[[[{{{{", "b": [1, [2]]}') == 3
    assert nesting_depth(b'["\\"[[[", [[]]]') == 3
    assert nesting_depth(b"") == 0
    # An unterminated string runs to the end (and stays linear: no retry per quote).
    assert nesting_depth(b'["' + b'\\"' * 200_000) == 1


def test_loads_limits() -> None:
    assert loads(_nested(MAX_DEPTH).encode()) is not None
    with pytest.raises(BadRequest, match="nested too deeply"):
        loads(_nested(MAX_DEPTH + 1).encode())
    with pytest.raises(BadRequest, match="nested too deeply"):
        loads(b"[" * 100_000)
    with pytest.raises(PayloadTooLarge, match="at most"):
        loads(b" " * (MAX_BODY_BYTES + 1))
    with pytest.raises(BadRequest, match="line 1 column 7"):
        loads(b'{"a": }')
    with pytest.raises(BadRequest, match="not UTF-8"):
        loads(b'{"a": "\xff"}')
    with pytest.raises(BadRequest, match="surrogate"):
        loads(b'{"a": "\\ud800"}')
    with pytest.raises(BadRequest, match="NaN"):
        loads(b'{"a": NaN}')
    # A pair is one character, and fine.
    assert loads(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}


# --- nesting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5000, 100_000])
async def test_deeply_nested_json_on_create_is_400(
    controller_harness: ControllerHarness, depth: int
) -> None:
    h = controller_harness
    body = '{"name": "deep", "computeEnvId": "x", "configuration": ' + _nested(depth) + "}"
    status, answer = await h.request("POST", "/studios", raw=body.encode())
    assert status == 400
    assert "nested too deeply" in _error_message(status, answer)
    assert await _studio_names(h) == []


async def test_deeply_nested_json_on_sign_in_unauthenticated_is_400(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    for body in (_nested(5000), '{"token": ' + _nested(100) + "}"):
        status, answer = await h.request(
            "POST",
            "/auth/sign-in",
            raw=body.encode(),
            token=None,
            headers={"Content-Type": "application/json"},
        )
        assert status == 400
        assert "nested too deeply" in _error_message(status, answer)


# --- size -------------------------------------------------------------------------------------


async def test_body_over_the_limit_is_413(controller_harness: ControllerHarness) -> None:
    h = controller_harness
    over = json.dumps({"name": "big", "computeEnvId": "x", "description": "d" * MAX_BODY_BYTES})
    status, answer = await h.request("POST", "/studios", raw=over.encode())
    assert status == 413
    assert f"at most {MAX_BODY_BYTES}" in _error_message(status, answer)
    # Over aiohttp's own limit too, and without Content-Length (chunked).
    huge = b"[" + b"1," * (3 * MAX_BODY_BYTES) + b"1]"
    status, answer = await h.request("POST", "/studios", raw=huge)
    assert status == 413
    _error_message(status, answer)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b" " * MAX_BODY_BYTES

    # Not bytes on purpose: aiohttp sends an async iterator chunked (no Content-Length).
    status, answer = await h.request("POST", "/studios", raw=chunks())  # type: ignore[arg-type]
    assert status == 413
    _error_message(status, answer)
    assert await _studio_names(h) == []


async def test_sign_in_form_over_the_limit_or_malformed_is_4xx(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    form = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    cases = [
        (b"token=" + b"a" * 10_000, 413),
        (b"token=%ff%fe", 400),
        (b"token=\xff", 400),
        # The next URL longer than the model allows (a 500 schemathesis found).
        (b"token=abc&next=" + b"0" * 3000, 400),
    ]
    for raw, expected in cases:
        status, _ = await h.request("POST", "/auth/sign-in", raw=raw, token=None, headers=form)
        assert status == expected, raw[:40]
    status, _ = await h.request(
        "POST",
        "/auth/sign-in",
        raw=b"token=abc",
        token=None,
        headers={"Content-Type": "text/plain; charset=nonsense"},
    )
    assert status == 400


# --- malformed JSON ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"name": ', "malformed JSON: line 1 column 10"),
        (b'{"name": "\xc3\x28"}', "not UTF-8"),
        (b'{"name": "a\\udc00", "computeEnvId": "x"}', "surrogate"),
        (b'{"name": "a", "computeEnvId": "x", "configuration": {"cpu": Infinity}}', "Infinity"),
        (b"[1, 2]", "must be a JSON object"),
    ],
)
async def test_malformed_json_is_400_saying_what(
    controller_harness: ControllerHarness, raw: bytes, words: str
) -> None:
    h = controller_harness
    status, answer = await h.request("POST", "/studios", raw=raw)
    assert status == 400
    assert words in _error_message(status, answer)


# --- bearer tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "tökén".encode("latin-1"),
        "tökén".encode(),
        b"\xff\xfe\xfd",
        b"abc def",
        b"a" * 600,
        b'"quoted"',
    ],
)
async def test_non_ascii_or_malformed_bearer_is_401(
    controller_harness: ControllerHarness, token: bytes
) -> None:
    h = controller_harness
    status, head, body = await _raw(
        h,
        b"GET /studios HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + token
        + b"\r\nConnection: close\r\n\r\n",
    )
    assert status == 401, (token, head, body)
    answer = json.loads(body)
    check_response("GET", "/studios", status, "application/json", answer)
    _error_message(status, answer)


async def test_well_formed_but_unknown_bearer_is_401(controller_harness: ControllerHarness) -> None:
    status, answer = await controller_harness.request("GET", "/studios", token="A-z0.9_~+/==")
    assert status == 401
    assert _error_message(status, answer) == "invalid API token"


# --- control characters -----------------------------------------------------------------------


@pytest.mark.parametrize(("char", "name"), [("\x00", "NUL"), ("\r", "CR"), ("\n", "LF")])
async def test_control_characters_in_names_are_400_naming_the_field(
    controller_harness: ControllerHarness, char: str, name: str
) -> None:
    h = controller_harness
    status, answer = await h.request(
        "POST", "/studios?autoStart=false", {"name": f"a{char}b", "computeEnvId": h.compute_env_id}
    )
    assert status == 400
    message = _error_message(status, answer)
    assert message.startswith("name: ") and f"control character {name}" in message
    assert await _studio_names(h) == []

    status, answer = await h.request("POST", "/orgs/1/teams", {"team": {"name": f"t{char}"}})
    assert status == 400
    assert _error_message(status, answer).startswith("team.name: ")
    _, teams = await h.request("GET", "/orgs/1/teams", expect=200)
    assert teams["teams"] == []

    status, answer = await h.request(
        "POST", "/data-links", {"name": f"link{char}", "resourceRef": "s3://bucket/x"}
    )
    assert status == 400
    assert _error_message(status, answer).startswith("name: ")
    _, links = await h.request("GET", "/data-links", expect=200)
    assert links["dataLinks"] == []

    status, answer = await h.request("POST", "/tokens", {"name": f"tok{char}"})
    assert status == 400
    assert _error_message(status, answer).startswith("name: ")


@pytest.mark.parametrize(("char", "name"), [("\x00", "NUL"), ("\r", "CR"), ("\x1b", "ESC")])
async def test_descriptions_refuse_control_characters_but_take_lines(
    controller_harness: ControllerHarness, char: str, name: str
) -> None:
    h = controller_harness
    status, answer = await h.request(
        "POST",
        "/studios?autoStart=false",
        {"name": "s", "computeEnvId": h.compute_env_id, "description": f"one{char}two"},
    )
    assert status == 400
    assert _error_message(status, answer).startswith(f"description: control character {name}")
    status, answer = await h.request(
        "POST", "/orgs/1/teams", {"team": {"name": "team1", "description": f"x{char}"}}
    )
    assert status == 400
    assert _error_message(status, answer).startswith("team.description: ")
    assert await _studio_names(h) == []
    # Descriptions are free text: lines and tabs are fine.
    _, body = await h.request(
        "POST",
        "/studios?autoStart=false",
        {"name": "s", "computeEnvId": h.compute_env_id, "description": "one\ntwo\tthree"},
        expect=200,
    )
    assert body["studio"]["description"] == "one\ntwo\tthree"
    sid = body["studio"]["sessionId"]
    status, answer = await h.request("PUT", f"/studios/{sid}", {"name": f"x{char}"})
    assert status == 400
    assert _error_message(status, answer).startswith("name: ")
    assert await _studio_names(h) == ["s"]


async def test_control_characters_in_path_or_query_are_400(
    controller_harness: ControllerHarness,
) -> None:
    h = controller_harness
    for path in ("/studios?search=a%00b", "/studios?search=a%0Ab", "/studios/ab%00cd"):
        status, answer = await h.request("GET", path)
        assert status == 400, path
        assert "control character" in _error_message(status, answer)
