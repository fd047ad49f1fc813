"""Raw HTTP/1.1 keep-alive connections to the connect proxy, for tests that need to see
exactly when the proxy ends a connection (revocation, a stopped session) rather than a
client library's reconnects."""

from __future__ import annotations

import asyncio

__all__ = ["KeepAlive", "read_response", "request_bytes"]


def request_bytes(path: str, cookie: str | None, session_id: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {session_id}.localhost"]
    if cookie is not None:
        lines.append(f"Cookie: studios-connect={cookie}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_response(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, bytes]:
    """(head, body) of one Content-Length response."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await asyncio.wait_for(reader.readexactly(length), timeout)


class KeepAlive:
    """One raw HTTP/1.1 connection to a session, kept open between requests."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session_id: str,
        timeout: float,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.session_id = session_id
        self.timeout = timeout

    @classmethod
    async def open(cls, port: int, session_id: str, timeout: float = 10.0) -> KeepAlive:
        return cls(*await asyncio.open_connection("127.0.0.1", port), session_id, timeout)

    async def get(self, path: str, cookie: str | None) -> tuple[bytes, bytes]:
        self.writer.write(request_bytes(path, cookie, self.session_id))
        await self.writer.drain()
        return await read_response(self.reader, self.timeout)

    async def closed_within(self, seconds: float) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), seconds) == b""
        except TimeoutError:
            return False
        except ConnectionError:
            return True  # reset by the proxy: closed too

    def close(self) -> None:
        self.writer.close()
