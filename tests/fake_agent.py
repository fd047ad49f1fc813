"""A fake agent for controller tests: a real gRPC client speaking agent.proto.

It does nothing on its own: a test tells it what to report (`report`,
`checkpoint`, `inventory`) and waits for what the controller sends
(`wait_desired`). Everything received is kept in `responses`.

It speaks the current protocol version; a test plays an older agent by
overriding `hello_request` and `response_type` with messages generated from an
older copy of agent.proto (tests/controller/test_protocol_upgrade.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from studios.agent.v1 import agent_pb2 as pb

__all__ = ["CONNECT_METHOD", "FakeAgent", "observed"]

# The one RPC, by path: the fake writes any message class that encodes agent.proto.
CONNECT_METHOD = "/studios.agent.v1.AgentService/Connect"


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def observed(
    session_id: str,
    generation: int,
    status: int,
    *,
    message: str = "",
    tool_port: int = 0,
    root_dir: str = "",
    progress: Iterable[pb.ProgressStep] = (),
) -> pb.SessionObserved:
    return pb.SessionObserved(
        session_id=session_id,
        generation=generation,
        status=status,  # type: ignore[arg-type]
        message=message,
        runtime="local",
        tool_port=tool_port,
        root_dir=root_dir,
        progress=list(progress),
    )


class FakeAgent:
    # What the controller's answers are decoded as.
    response_type: Any = pb.ConnectResponse

    def __init__(
        self,
        target: str,
        token: str,
        *,
        agent_id: str,
        compute_env_id: str,
        proxy_url: str = "http://localhost:7070",
        memory_available: int = 8 << 30,
        protocol_version: int = pb.PROTOCOL_VERSION_V2,
    ) -> None:
        self.target = target
        self.token = token
        self.agent_id = agent_id
        self.compute_env_id = compute_env_id
        self.proxy_url = proxy_url
        self.memory_available = memory_available
        self.protocol_version = protocol_version
        self.responses: list[pb.ConnectResponse] = []
        self.welcome: pb.Welcome | None = None
        self.error: grpc.aio.AioRpcError | None = None
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def hello(self) -> pb.Hello:
        return pb.Hello(
            protocol_version=self.protocol_version,  # type: ignore[arg-type]
            agent_id=self.agent_id,
            hostname="fake-host",
            compute_env_id=self.compute_env_id,
            runtime_kind=pb.RUNTIME_KIND_LOCAL,
            proxy_url=self.proxy_url,
            agent_version="test",
            capacity=pb.HostCapacity(
                cpus=4, memory_bytes=16 << 30, memory_available_bytes=self.memory_available
            ),
        )

    def hello_request(self) -> Any:
        return pb.ConnectRequest(hello=self.hello())

    async def connect(
        self,
        *,
        inventory: Iterable[pb.SessionObserved] | None = None,
        first: pb.ConnectRequest | None = None,
        wait_welcome: bool = True,
    ) -> None:
        """Open the stream, send Hello (or `first`) and optionally an Inventory."""
        self._channel = grpc.aio.insecure_channel(self.target)
        connect = self._channel.stream_stream(
            CONNECT_METHOD,
            request_serializer=_serialize,
            response_deserializer=self.response_type.FromString,
        )
        self._call = connect(metadata=(("authorization", f"Bearer {self.token}"),))
        try:
            await self._call.write(first or self.hello_request())
            if inventory is not None:
                await self.send(pb.ConnectRequest(inventory=pb.Inventory(sessions=list(inventory))))
        except grpc.aio.AioRpcError as exc:
            # The controller may refuse the stream (bad token, bad Hello) before a write
            # goes through: the refusal is the answer, for `wait_error` to see.
            if wait_welcome:
                raise
            self.error = exc
        self._reader = asyncio.create_task(self._read())
        if wait_welcome:
            await self.wait_for(lambda r: r.HasField("welcome"))

    async def _read(self) -> None:
        try:
            while True:
                msg = await self._call.read()
                if msg is grpc.aio.EOF:
                    return
                if msg.HasField("welcome"):
                    self.welcome = msg.welcome
                self.responses.append(msg)
                self._changed.set()
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            self._changed.set()

    async def send(self, request: Any) -> None:
        await self._call.write(request)

    async def report(self, session_id: str, generation: int, status: int, **kwargs: Any) -> None:
        await self.send(
            pb.ConnectRequest(session=observed(session_id, generation, status, **kwargs))
        )

    async def inventory(self, sessions: Iterable[pb.SessionObserved]) -> None:
        await self.send(pb.ConnectRequest(inventory=pb.Inventory(sessions=list(sessions))))

    async def checkpoint(
        self,
        session_id: str,
        generation: int,
        key: str,
        status: int = pb.CHECKPOINT_STATUS_FINALIZED,
        *,
        uri: str | None = None,
        size: int = 1234,
        saved_at: int | None = None,
    ) -> None:
        await self.send(
            pb.ConnectRequest(
                checkpoint=pb.CheckpointEvent(
                    session_id=session_id,
                    generation=generation,
                    key=key,
                    uri=uri or f"file:///work/.studios/checkpoints/{key}",
                    status=status,  # type: ignore[arg-type]
                    size_bytes=size,
                    saved_at=int(time.time()) if saved_at is None else saved_at,
                )
            )
        )

    async def wait_for(
        self,
        predicate: Callable[[pb.ConnectResponse], bool],
        *,
        start: int = 0,
        timeout: float = 10.0,
    ) -> pb.ConnectResponse:
        """The first response from index `start` on that matches `predicate`."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for msg in self.responses[start:]:
                if predicate(msg):
                    return msg
            if self._reader is not None and self._reader.done():
                raise AssertionError(f"stream ended ({self.error!r}) while waiting")
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"timed out; received: {self.responses}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()

    async def wait_desired(
        self,
        session_id: str,
        status: int | None = None,
        *,
        full: bool | None = None,
        start: int = 0,
        timeout: float = 10.0,
    ) -> pb.SessionDesired:
        """The first SessionDesired of `session_id` (with `status`) since index `start`."""

        def matches(msg: pb.ConnectResponse) -> bool:
            if not msg.HasField("desired") or (full is not None and msg.desired.full != full):
                return False
            return any(
                s.session_id == session_id and (status is None or s.status == status)
                for s in msg.desired.sessions
            )

        msg = await self.wait_for(matches, start=start, timeout=timeout)
        return next(s for s in msg.desired.sessions if s.session_id == session_id)

    def acks(self, session_id: str | None = None) -> list[pb.CheckpointAck]:
        """Every CheckpointAck received (of `session_id`), in order."""
        return [
            m.checkpoint_ack
            for m in self.responses
            if m.HasField("checkpoint_ack")
            and (session_id is None or m.checkpoint_ack.session_id == session_id)
        ]

    async def wait_ack(
        self, session_id: str, key: str, *, start: int = 0, timeout: float = 10.0
    ) -> pb.CheckpointAck:
        """The first CheckpointAck of (session_id, key) since response index `start`."""
        msg = await self.wait_for(
            lambda r: (
                r.HasField("checkpoint_ack")
                and r.checkpoint_ack.session_id == session_id
                and r.checkpoint_ack.key == key
            ),
            start=start,
            timeout=timeout,
        )
        return msg.checkpoint_ack

    async def wait_error(self, timeout: float = 10.0) -> grpc.aio.AioRpcError:
        assert self._reader is not None
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        assert self.error is not None, "the stream ended without an error"
        return self.error

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._channel is not None:
            await self._channel.close()
