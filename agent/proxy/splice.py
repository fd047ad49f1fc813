"""The tool side of a proxied connection as a small transport that splices.

What the tool sends is passed to the client untouched (the proxy never parses
responses), so on Linux those bytes need not enter Python at all: `os.splice` moves
them from the tool's socket into a pipe and from the pipe into the client's socket
inside the kernel. One pipe serves the whole proxy: a read callback splices into it
and empties it again before returning (what the client's socket cannot take now is
read out of the pipe and handed to the client's asyncio transport, which buffers it
and pauses this side as usual), so an idle connection, a WebSocket say, holds no
pipe and no extra descriptor.

Bytes are spliced into the client socket only while the client's transport has
nothing buffered itself, so the order of what the client receives is kept. A
connection splices once a read filled at least `SPLICE_AFTER` (a large body is
flowing) and goes back to plain reads after a smaller one. The protocol also decides
per read (`_SpliceProtocol.splice_fd`): it asks for plain bytes
while it must see them (the status line after a WebSocket upgrade request) and
whenever the client is TLS or busy.

The other direction (client to tool, where every request head is parsed and
rewritten) is written with `send` and buffered here, with the usual asyncio flow
control (`pause_writing` above `BUFFER_HIGH`, `resume_writing` below a quarter).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import socket
from typing import Any, Protocol

__all__ = ["PIPE_BYTES", "SpliceTransport", "splice_supported"]

log = logging.getLogger(__name__)

# One splice call moves at most this much (and the shared pipe holds this much):
# a 1 MiB response crosses in one or two calls instead of sixteen 64 KiB ones.
PIPE_BYTES = 1024 * 1024
# Plain reads (the status line after an upgrade, a TLS or busy client) are this large.
READ_BYTES = 256 * 1024
# A read at least this large switches the connection to splicing, a smaller one back
# to plain reads: a small response costs fewer calls through recv/send than through a
# pipe (two splices), a large one far fewer copies (measured in bench_proxy_relay).
SPLICE_AFTER = 64 * 1024
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


def splice_supported() -> bool:
    """Whether this platform has `os.splice` (Linux, Python 3.10+)."""
    return hasattr(os, "splice")


class _SpliceProtocol(Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> bool | None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def splice_fd(self) -> int | None: ...
    def spliced(self, nbytes: int) -> None: ...
    def spliced_rest(self, data: bytes) -> None: ...


class _Pipe:
    """The proxy's one pipe, made on first use; a forked child (a worker) makes its own
    rather than share its parent's."""

    def __init__(self) -> None:
        self.r = -1
        self.w = -1

    def get(self) -> tuple[int, int]:
        if self.r < 0:
            self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            # A bigger pipe means fewer calls per large body; refused, the default is used.
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        return self.r, self.w

    def forget(self) -> None:
        for fd in (self.r, self.w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.r = self.w = -1


_PIPE = _Pipe()
# Not os.getpid() on every read (a system call): reset once in a forked child.
os.register_at_fork(after_in_child=_PIPE.forget)


class SpliceTransport(asyncio.Transport):
    """A connected non-blocking TCP socket driven by the loop's reader and writer
    callbacks (this transport owns the descriptor; no asyncio transport does)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: _SpliceProtocol
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._buffer: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._high = 1024 * 1024
        self._low = self._high // 4
        self._writing_paused = False
        self._reading = False
        self._closing = False
        self._eof_sent = False
        self._want_eof = False
        self._lost = False
        self._big = False
        protocol.connection_made(self)
        self.resume_reading()

    # ------------------------------------------------------------ BaseTransport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "peername":
            with contextlib.suppress(OSError):
                return self._sock.getpeername()
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._buffer:
            self._loop.call_soon(self._lose, None)

    def abort(self) -> None:
        self._closing = True
        self._lose(None)

    # ------------------------------------------------------------ reading

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing and not self._lost:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)

    def _read_ready(self) -> None:
        try:
            target = self._protocol.splice_fd() if self._big else None
            if target is None:
                data = self._sock.recv(READ_BYTES)
                if data:
                    self._big = len(data) >= SPLICE_AFTER
                    self._protocol.data_received(data)
                    return
            elif self._splice(target):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lose(exc)
            return
        # End of stream from the tool.
        self.pause_reading()
        keep_open = self._protocol.eof_received()
        if not keep_open:
            self.close()

    def _splice(self, target: int) -> bool:
        """Tool socket -> pipe -> client socket; False at the tool's end of stream."""
        r, w = _PIPE.get()
        n = os.splice(self._fd, w, PIPE_BYTES, flags=_FLAGS)
        if n == 0:
            return False
        self._big = n >= SPLICE_AFTER
        self._protocol.spliced(n)
        left = n
        try:
            while left:
                left -= os.splice(r, target, left, flags=_FLAGS)
        except (BlockingIOError, InterruptedError):
            pass  # the client's socket is full: the rest goes through its transport
        except OSError:
            # The client went away: its transport notices; the pipe is emptied below.
            pass
        if left:
            rest = bytearray()
            while len(rest) < left:
                rest += os.read(r, left - len(rest))
            self._protocol.spliced_rest(bytes(rest))
        return True

    # ------------------------------------------------------------ writing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost or self._eof_sent or not data:
            return
        data = bytes(data)
        if not self._buffer:
            try:
                n = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._lose(exc)
                return
            data = data[n:]
            if not data:
                return
            self._loop.add_writer(self._fd, self._write_ready)
        self._buffer.append(data)
        self._buffered += len(data)
        if not self._writing_paused and self._buffered > self._high:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _write_ready(self) -> None:
        while self._buffer:
            data = self._buffer[0]
            try:
                n = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lose(exc)
                return
            self._buffered -= n
            if n < len(data):
                self._buffer[0] = data[n:]
                return
            self._buffer.popleft()
        self._loop.remove_writer(self._fd)
        if self._writing_paused and self._buffered <= self._low:
            self._writing_paused = False
            self._protocol.resume_writing()
        if self._want_eof:
            self._shutdown_write()
        if self._closing:
            self._lose(None)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._closing or self._eof_sent:
            return
        self._want_eof = True
        if not self._buffer:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        self._want_eof = False
        self._eof_sent = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    # ------------------------------------------------------------ the end

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self.pause_reading()
        if self._buffer:
            self._loop.remove_writer(self._fd)
            self._buffer.clear()
            self._buffered = 0
        self._sock.close()
        try:
            self._protocol.connection_lost(exc)
        except Exception:  # pragma: no cover - a protocol error must not leak the socket
            log.exception("proxy: closing the tool connection failed")
