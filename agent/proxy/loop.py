"""The event loop of the processes that run the connect proxy: uvloop where installed.

The proxy's cost per small request is mostly the event loop's (reading, writing and
dispatching for two sockets) rather than its own code; uvloop (libuv, in C) does that
part with a fraction of the Python of asyncio's selector loop (measured with
tests/bench/bench_proxy_relay.py). grpc.aio, aiohttp and subprocesses run on it too,
so the agent's process uses it as well as the worker processes. Without uvloop (another
platform, an environment without it) asyncio's own loop is used.
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
