"""How the daemons log: text (the default) or one JSON object per line.

`--log-format json` (or STUDIOS_LOG_FORMAT=json) suits a log shipper: each record is a
single line `{"time", "level", "logger", "message"}` plus `"exception"` (the formatted
traceback) when the record carries one; newlines inside a message stay escaped in the
JSON string, so a record is never split across lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import TextIO

__all__ = [
    "LOG_FORMATS",
    "TEXT_FORMAT",
    "JsonFormatter",
    "configure_logging",
    "resolve_log_format",
]

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ENVIRONMENT_VARIABLE = "STUDIOS_LOG_FORMAT"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, str] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def resolve_log_format(flag: str | None) -> str:
    """The flag's format, else STUDIOS_LOG_FORMAT's, else text; ValueError naming the
    variable when it names no format."""
    if flag:
        return flag
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    if not value:
        return "text"
    if value not in LOG_FORMATS:
        raise ValueError(
            f"{ENVIRONMENT_VARIABLE}: expected {' or '.join(LOG_FORMATS)}, got {value!r}"
        )
    return value


def configure_logging(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """The root logger writes to `stream` (stderr) in `log_format` at `level`."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    # Not forced: where the root logger already has handlers (a test runner's) they stay.
    logging.basicConfig(level=level.upper(), handlers=[handler])
