"""The event loop of the connect proxy's worker processes: uvloop where installed.

The proxy's cost per small request is mostly the event loop's (reading, writing and
dispatching for two sockets) rather than its own code; uvloop (libuv, in C) does that
part with a fraction of the Python of asyncio's selector loop (measured with
tests/bench/bench_proxy_relay.py). Without uvloop (another platform, an environment
without it) asyncio's own loop is used.

Only the workers (`--proxy-workers N`, agent.proxy.worker) run on it, never the agent's
own process. uvloop runs Python's at-fork hooks in the child of every subprocess it
spawns (asyncio does not: uvloop issue #749), so a child of a process with threads runs
Python code between fork and exec. The agent spawns podman, mount and the workers
beside grpc's, aiosqlite's and fsspec's threads; in a CI run such a child aborted
("Fatal Python error: Aborted" in fsspec's at-fork hook) before it could exec. A worker
spawns nothing and runs no gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "run"]

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor, or None (asyncio's default) where it is missing."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the loop of `loop_factory`."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
