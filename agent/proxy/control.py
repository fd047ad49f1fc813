"""The control channel between the agent and a proxy worker process.

One `socket.socketpair()` per worker: the child inherits its end as a descriptor (never
a path another process could open), so whatever arrives on it comes from the agent or
from its own worker. Messages are JSON objects, each sent as a 4-byte big-endian length
and that many bytes of UTF-8 JSON. A frame longer than `MAX_FRAME` breaks the stream
(`ControlError`): the reader cannot resynchronise, so the channel is given up.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

__all__ = ["MAX_FRAME", "ControlError", "encode", "read_message"]

# The largest message: a full session table or access table of a busy host fits many
# times over; anything larger is a broken or hostile peer.
MAX_FRAME = 16 * 1024 * 1024
_LENGTH = struct.Struct(">I")


class ControlError(Exception):
    """The control stream cannot be read any further."""


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise ControlError(f"control message of {len(data)} bytes exceeds {MAX_FRAME}")
    return _LENGTH.pack(len(data)) + data


async def read_message(reader: asyncio.StreamReader) -> Any | None:
    """The next message (any JSON value: the caller checks its shape), or None at EOF.

    A frame that is not JSON raises ValueError and leaves the stream usable (the next
    frame starts where it ended); a length beyond `MAX_FRAME` raises `ControlError`."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ControlError("control stream ended inside a frame's length") from None
        return None
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME:
        raise ControlError(f"control frame of {length} bytes exceeds {MAX_FRAME}")
    try:
        data = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ControlError("control stream ended inside a frame") from None
    return json.loads(data)
