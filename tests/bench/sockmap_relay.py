"""A minimal plain-HTTP relay whose response bytes the kernel carries (BPF sockmap).

For bench_proxy_sockmap.py only: is an in-kernel socket-to-socket path a route to the
connect proxy's 1 MiB target (issue 18)? Requests are copied in userspace; each backend
socket sits in a SOCKHASH with an SK_SKB verdict program that redirects every skb it
receives to the egress of its client socket, found in a second SOCKHASH under the
backend socket's local port. No identity, no cookies: a probe of the byte path, not a
proxy. Needs root (CAP_BPF and CAP_NET_ADMIN) and a kernel with CONFIG_BPF_STREAM_PARSER.

    python tests/bench/sockmap_relay.py (copy|sockmap) LISTEN_PORT BACKEND_PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import struct
import sys

_libc = ctypes.CDLL(None, use_errno=True)
_NR_BPF = 321  # x86_64
_MAP_CREATE, _MAP_UPDATE, _MAP_DELETE, _PROG_LOAD, _PROG_ATTACH = 0, 2, 3, 5, 8
_MAP_SOCKHASH = 18
_PROG_SK_SKB = 14
_ATTACH_SK_SKB_VERDICT = 38
# offsetof(struct __sk_buff, local_port): host byte order.
_SKB_LOCAL_PORT = 136
_HELPER_SK_REDIRECT_HASH = 72


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    fd = int(_libc.syscall(_NR_BPF, cmd, buf, 128))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return fd


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _verdict_program(clients_map: int) -> int:
    """skb -> bpf_sk_redirect_hash(skb, clients, &skb->local_port, egress)."""
    code = b"".join(
        [
            _insn(0xBF, 6, 1),  # r6 = r1 (the skb)
            _insn(0x61, 2, 6, _SKB_LOCAL_PORT),  # r2 = skb->local_port
            _insn(0x63, 10, 2, -4),  # *(u32 *)(r10 - 4) = r2
            _insn(0xBF, 1, 6),  # r1 = r6
            _insn(0x18, 2, 1, 0, clients_map),  # r2 = the clients map (pseudo map fd)
            _insn(0),
            _insn(0xBF, 3, 10),  # r3 = r10
            _insn(0x07, 3, 0, 0, -4),  # r3 -= 4: the key
            _insn(0xB7, 4, 0, 0, 0),  # r4 = 0: to the target's egress
            _insn(0x85, 0, 0, 0, _HELPER_SK_REDIRECT_HASH),
            _insn(0x95),  # exit with the helper's verdict
        ]
    )
    insns = ctypes.create_string_buffer(code, len(code))
    licence = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)
    attr = struct.pack(
        "IIQQIIQ",
        _PROG_SK_SKB,
        len(code) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(licence),
        1,
        len(log),
        ctypes.addressof(log),
    )
    try:
        return _bpf(_PROG_LOAD, attr)
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror}: {log.value.decode(errors='replace')}") from None


class SockmapPath:
    """The two maps and the program: a backend socket's bytes go to its client's egress."""

    def __init__(self) -> None:
        self.backends = _bpf(_MAP_CREATE, struct.pack("IIIII", _MAP_SOCKHASH, 4, 4, 4096, 0))
        self.clients = _bpf(_MAP_CREATE, struct.pack("IIIII", _MAP_SOCKHASH, 4, 4, 4096, 0))
        program = _verdict_program(self.clients)
        _bpf(
            _PROG_ATTACH,
            struct.pack("IIII", self.backends, program, _ATTACH_SK_SKB_VERDICT, 0),
        )

    @staticmethod
    def _update(map_fd: int, key: int, sock_fd: int) -> None:
        k, v = ctypes.c_uint32(key), ctypes.c_uint32(sock_fd)
        attr = struct.pack("IIQQQ", map_fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0)
        _bpf(_MAP_UPDATE, attr)

    @staticmethod
    def _delete(map_fd: int, key: int) -> None:
        k = ctypes.c_uint32(key)
        with contextlib.suppress(OSError):
            _bpf(_MAP_DELETE, struct.pack("IIQ", map_fd, 0, ctypes.addressof(k)))

    def join(self, backend_port: int, backend_fd: int, client_fd: int) -> None:
        # The client first: the program may run as soon as the backend is in its map.
        self._update(self.clients, backend_port, client_fd)
        self._update(self.backends, backend_port, backend_fd)

    def leave(self, backend_port: int) -> None:
        self._delete(self.backends, backend_port)
        self._delete(self.clients, backend_port)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 18):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def serve(mode: str, port: int, backend_port: int) -> None:
    path = SockmapPath() if mode == "sockmap" else None

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        br, bw = await asyncio.open_connection("127.0.0.1", backend_port)
        if path is None:
            await asyncio.gather(_copy(cr, bw), _copy(br, cw))
            return
        bsock, csock = bw.get_extra_info("socket"), cw.get_extra_info("socket")
        key = bsock.getsockname()[1]
        try:
            # Refused (EOPNOTSUPP) for a socket no longer established: wrk closing.
            path.join(key, bsock.fileno(), csock.fileno())
        except OSError:
            path.leave(key)
            bw.close()
            cw.close()
            return
        try:
            await _copy(cr, bw)
        finally:
            path.leave(key)
            cw.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
