"""A real in-process gRPC controller for agent tests.

It implements `AgentService.Connect`, checks the bearer token, answers Hello with a
Welcome and the full desired set it holds, records everything the agent sends, and
lets a test push DesiredState at any time. It can be stopped and started again on
the same port to test reconnects.

With `acks=True` checkpoint events are acknowledged as the real controller does (it
"records" an event on receipt); `drop_acks=N` then loses the next N acks (as a stream
that breaks after the controller's commit would) and `refuse` names sessions whose
events are refused. The default, `acks=False`, plays a controller older than acks
(the agent then re-sends events on reconnects for a while), which the agent tests
written before acks existed rely on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
from studios.agent.v1 import agent_pb2 as pb
from studios.agent.v1 import agent_pb2_grpc as pb_grpc

__all__ = ["FakeController", "desired"]


def desired(
    session_id: str,
    status: int = pb.DESIRED_STATUS_RUNNING,
    generation: int = 1,
    image: str = "studios/python-http:3.11-0.1",
    restore_uri: str = "",
    checkpoint_base_uri: str = "",
    environment: dict[str, str] | None = None,
) -> pb.SessionDesired:
    return pb.SessionDesired(
        session_id=session_id,
        status=status,  # type: ignore[arg-type]
        generation=generation,
        spec=pb.SessionSpec(
            image=image,
            tool="python-http",
            environment=environment or {},
            studio_name=f"studio {session_id}",
            checkpoint_base_uri=checkpoint_base_uri,
        ),
        restore=pb.CheckpointRef(checkpoint_id=1, uri=restore_uri) if restore_uri else None,
    )


class FakeController(pb_grpc.AgentServiceServicer):
    def __init__(
        self,
        token: str = "agent-secret",
        key: bytes = b"k" * 32,
        heartbeat: int = 1,
        *,
        acks: bool = False,
        protocols: frozenset[int] = frozenset({pb.PROTOCOL_VERSION_V1, pb.PROTOCOL_VERSION_V2}),
    ) -> None:
        self.token = token
        self.key = key
        self.heartbeat = heartbeat
        self.acks = acks
        # The protocol versions it speaks: {V1} plays a controller older than V2.
        self.protocols = protocols
        self.drop_acks = 0
        self.refuse: set[str] = set()
        # Every ack sent, in order: (stream number, ack).
        self.acked: list[tuple[int, pb.CheckpointAck]] = []
        # Everything received, in order: (stream number, message).
        self.received: list[tuple[int, pb.ConnectRequest]] = []
        self.streams = 0
        self.refused = 0
        self.desired: dict[str, pb.SessionDesired] = {}
        self._queues: list[asyncio.Queue[pb.ConnectResponse]] = []
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self._changed = asyncio.Event()

    # ------------------------------------------------------------ server

    async def start(self, port: int = 0) -> int:
        self._server = grpc.aio.server()
        pb_grpc.add_AgentServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        await self._server.start()
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None
        self._queues.clear()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------ test API

    def push(self, *sessions: pb.SessionDesired, full: bool = False) -> None:
        """Update the held desired set and send it (partial unless full) to the agent."""
        if full:
            self.desired = {}
        for s in sessions:
            self.desired[s.session_id] = s
        msg = pb.ConnectResponse(desired=pb.DesiredState(full=full, sessions=list(sessions)))
        for q in self._queues:
            q.put_nowait(msg)

    def messages(self, kind: str) -> list[Any]:
        return [getattr(m, kind) for _, m in self.received if m.WhichOneof("message") == kind]

    def observed(self, session_id: str) -> list[pb.SessionObserved]:
        """Every observation of a session, from SessionObserved and Inventory, in order."""
        out = []
        for _, m in self.received:
            kind = m.WhichOneof("message")
            if kind == "session" and m.session.session_id == session_id:
                out.append(m.session)
            elif kind == "inventory":
                out.extend(s for s in m.inventory.sessions if s.session_id == session_id)
        return out

    def latest(self, session_id: str) -> pb.SessionObserved | None:
        obs = self.observed(session_id)
        return obs[-1] if obs else None

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {predicate}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=0.2)
            except TimeoutError:
                pass

    async def wait_status(
        self, session_id: str, status: int, generation: int | None = None, timeout: float = 20.0
    ) -> pb.SessionObserved:
        def check() -> pb.SessionObserved | None:
            obs = self.latest(session_id)
            if obs is not None and obs.status == status:
                if generation is None or obs.generation == generation:
                    return obs
            return None

        result: pb.SessionObserved = await self.wait_for(check, timeout)
        return result

    # ------------------------------------------------------------ servicer

    async def Connect(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get("authorization") != f"Bearer {self.token}":
            self.refused += 1
            self._changed.set()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid agent token")
        self.streams += 1
        stream = self.streams
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("message") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first message must be Hello")
        self._record(stream, first)
        if first.hello.protocol_version not in self.protocols:
            # What a controller that does not speak the version answers (a V1 one's words).
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {first.hello.protocol_version} is not supported "
                f"(supported: {sorted(self.protocols)})",
            )
        await context.write(
            pb.ConnectResponse(
                welcome=pb.Welcome(
                    protocol_version=first.hello.protocol_version,
                    agent_id=first.hello.agent_id,
                    heartbeat_interval_seconds=self.heartbeat,
                    connect_token_key=self.key,
                    checkpoint_acks=self.acks,
                )
            )
        )
        queue: asyncio.Queue[pb.ConnectResponse] = asyncio.Queue()
        queue.put_nowait(
            pb.ConnectResponse(
                desired=pb.DesiredState(full=True, sessions=list(self.desired.values()))
            )
        )
        self._queues.append(queue)

        async def reader() -> None:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    return
                self._record(stream, msg)
                if msg.WhichOneof("message") == "checkpoint" and self.acks:
                    ack = self._ack(msg.checkpoint)
                    if ack is not None:
                        self.acked.append((stream, ack))
                        queue.put_nowait(pb.ConnectResponse(checkpoint_ack=ack))

        read_task = asyncio.create_task(reader())
        try:
            while True:
                get = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({get, read_task}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    await context.write(get.result())
                else:
                    get.cancel()
                    return
        finally:
            read_task.cancel()
            if queue in self._queues:
                self._queues.remove(queue)

    def _ack(self, event: pb.CheckpointEvent) -> pb.CheckpointAck | None:
        if self.drop_acks > 0:
            self.drop_acks -= 1
            return None
        refused = event.session_id in self.refuse
        return pb.CheckpointAck(
            session_id=event.session_id,
            key=event.key,
            generation=event.generation,
            result=(
                pb.CHECKPOINT_ACK_RESULT_REFUSED if refused else pb.CHECKPOINT_ACK_RESULT_RECORDED
            ),
            message=f"session {event.session_id} is unknown" if refused else "",
        )

    def acks_for(self, session_id: str) -> list[pb.CheckpointAck]:
        return [a for _, a in self.acked if a.session_id == session_id]

    def _record(self, stream: int, msg: pb.ConnectRequest) -> None:
        self.received.append((stream, msg))
        self._changed.set()
