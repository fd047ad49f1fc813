"""Request bodies as JSON, parsed with limits: every JSON body of the REST API comes through here.

- Size: at most `MAX_BODY_BYTES` (413 `PayloadTooLarge` saying the limit).
- Nesting: at most `MAX_DEPTH` arrays and objects inside each other (400). Counted by a
  linear pre-scan over the text (brackets outside strings) *before* parsing: Python's
  decoder recurses, and a body of a few thousand ``[`` would otherwise end in a
  RecursionError (a 500) — or, deep enough, in the stack.
- Text: UTF-8 (400 otherwise), no unpaired UTF-16 surrogate escapes (``"\\ud800"``, which no
  database can store: 400), and no NaN or Infinity (not JSON, though Python's decoder
  reads them).
- Malformed JSON: 400 saying where ("line 1 column 7: Expecting value").

What the body means (fields, types, control characters in names) is the request models'
business (`controller.requests`).
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

from controller.errors import BadRequest, PayloadTooLarge

__all__ = ["MAX_BODY_BYTES", "MAX_DEPTH", "check_size", "loads"]

# The largest legitimate body (a studio with a 2 KiB description, a conda environment,
# environment variables and mounts) is a few KiB.
MAX_BODY_BYTES = 256 * 1024
# The deepest legitimate body is 4 levels (computeEnv.config.fileSystemMounts[i]).
MAX_DEPTH = 32

# A JSON string, escapes included; an unterminated one runs to the end (so the scan stays
# linear: no retrying from every quote inside it).
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_CONSTANTS = {"NaN", "Infinity", "-Infinity"}


def check_size(length: int | None, limit: int = MAX_BODY_BYTES) -> None:
    """PayloadTooLarge when a body of `length` bytes is over `limit` (None: unknown, fine)."""
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body too large ({length} bytes; at most {limit})")


def nesting_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in the JSON text `raw` (brackets in strings ignored)."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if len(brackets) <= 1:
        return len(brackets)
    return max(accumulate(_STEP[b] for b in brackets))


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(raw: bytes, *, max_depth: int = MAX_DEPTH, limit: int = MAX_BODY_BYTES) -> Any:
    """The JSON value of a request body; BadRequest (or PayloadTooLarge) saying what is wrong."""
    check_size(len(raw), limit)
    # Cheap first: a body with fewer brackets than the limit cannot nest deeper.
    if raw.count(b"[") + raw.count(b"{") > max_depth:
        depth = nesting_depth(raw)
        if depth > max_depth:
            raise BadRequest(f"JSON nested too deeply ({depth} levels; at most {max_depth})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"malformed JSON: line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except ValueError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    except RecursionError:  # pragma: no cover - the pre-scan refuses these first
        raise BadRequest(f"JSON nested too deeply (at most {max_depth} levels)") from None
    if "\\u" in text and _has_lone_surrogate(value):
        raise BadRequest("malformed JSON: a string holds an unpaired UTF-16 surrogate")
    return value


def _has_lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
