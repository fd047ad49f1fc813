"""`--log-format json` / STUDIOS_LOG_FORMAT: one JSON object per line, the exception's
text included; a variable naming no format stops either daemon, saying so."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable

import pytest

from agent import cli as agent_cli
from controller import cli as controller_cli
from studios_shared.log_format import JsonFormatter, resolve_log_format


def _record(logger: logging.Logger, message: str, *args: object, exc: bool = False) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.propagate = False  # this record only, not the test runner's handlers
    try:
        if exc:
            try:
                raise ValueError("bad value\nsecond line")
            except ValueError:
                logger.exception(message, *args)
        else:
            logger.warning(message, *args)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    return stream.getvalue()


def test_one_object_per_line_with_the_exception() -> None:
    out = _record(logging.getLogger("studios.test.json"), "failed: %s\nmore", "x", exc=True)
    lines = out.splitlines()
    assert len(lines) == 1, out  # newlines stay inside the JSON strings
    record = json.loads(lines[0])
    assert record["level"] == "ERROR"
    assert record["logger"] == "studios.test.json"
    assert record["message"] == "failed: x\nmore"
    assert record["time"].endswith("+00:00") and "T" in record["time"]
    assert "ValueError: bad value\nsecond line" in record["exception"]
    assert "Traceback" in record["exception"]


def test_no_exception_key_without_one() -> None:
    record = json.loads(_record(logging.getLogger("studios.test.plain"), "héllo"))
    assert record["message"] == "héllo" and "exception" not in record


def test_flag_then_variable_then_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STUDIOS_LOG_FORMAT", raising=False)
    assert resolve_log_format(None) == "text"
    monkeypatch.setenv("STUDIOS_LOG_FORMAT", "JSON")
    assert resolve_log_format(None) == "json"
    assert resolve_log_format("text") == "text"


@pytest.mark.parametrize("main", [controller_cli.main, agent_cli.main], ids=["controller", "agent"])
def test_a_bad_variable_names_itself(
    main: Callable[[list[str] | None], int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("STUDIOS_LOG_FORMAT", "yaml")
    argv = ["serve", "--data-dir", "/nonexistent"]
    if main is agent_cli.main:
        argv = [
            "serve",
            "--controller",
            "127.0.0.1:1",
            "--token-file",
            "/nonexistent",
            "--compute-env",
            "x",
            "--state-dir",
            "/nonexistent",
        ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "STUDIOS_LOG_FORMAT: expected text or json, got 'yaml'" in err
