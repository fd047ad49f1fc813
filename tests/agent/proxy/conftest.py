"""Every proxy test runs on both loops the proxy may run on: asyncio's (the agent's
process) and uvloop's (its workers, `agent.proxy.loop`). The tests that start workers
(test_workers) spawn them as the agent does, from asyncio's loop only: spawning from
uvloop runs Python in the child before exec, which the agent never does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.name == "test_workers.py":
        return {"asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
