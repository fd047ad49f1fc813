"""Shared fixtures.

Controller tests: `controller_harness` runs the real controller in-process
(REST + gRPC on free ports of 127.0.0.1) on a temporary SQLite file, with an
API client for the bootstrap admin and a compute environment ready.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controller.app import Controller
from controller.config import ControllerConfig


class ControllerHarness:
    def __init__(self, data_dir: Path, database_url: str | None = None) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        self.controller: Controller | None = None
        self.http: aiohttp.ClientSession | None = None
        self.compute_env_id = ""

    @property
    def url(self) -> str:
        assert self.controller is not None
        return f"http://127.0.0.1:{self.controller.http_port}"

    @property
    def grpc_target(self) -> str:
        assert self.controller is not None
        return f"127.0.0.1:{self.controller.grpc_port}"

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    @property
    def agent_token(self) -> str:
        return (self.data_dir / "agent-token").read_text().strip()

    async def start(self, *, with_compute_env: bool = True) -> None:
        config = ControllerConfig(
            data_dir=self.data_dir,
            http_port=0,
            grpc_port=0,
            database_url=self.database_url,
            reconcile_interval_seconds=0.2,
        )
        self.controller = Controller(config)
        await self.controller.start()
        if self.http is None:
            self.http = aiohttp.ClientSession()
        if with_compute_env and not self.compute_env_id:
            _, body = await self.request(
                "POST",
                "/compute-envs",
                {
                    "computeEnv": {
                        "name": "local",
                        "platform": "studio-agent",
                        "config": {"workDir": "file:///tmp/work"},
                    }
                },
                expect=200,
            )
            self.compute_env_id = body["computeEnvId"]

    async def restart(self) -> None:
        """A new controller process (as far as the code can tell) on the same data."""
        assert self.controller is not None
        await self.controller.stop()
        await self.start()

    async def close(self) -> None:
        if self.controller is not None:
            await self.controller.stop()
        if self.http is not None:
            await self.http.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = "admin",
        raw: bytes | None = None,
        expect: int | None = None,
        **kwargs: Any,
    ) -> tuple[int, Any]:
        """(status, parsed JSON body or None)."""
        assert self.http is not None
        headers = dict(kwargs.pop("headers", {}))
        if token == "admin":
            token = self.admin_token
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        async with self.http.request(
            method, self.url + path, data=data, headers=headers, **kwargs
        ) as resp:
            text = await resp.text()
            parsed = json.loads(text) if text and resp.content_type == "application/json" else None
            if expect is not None:
                assert resp.status == expect, f"{method} {path}: {resp.status} {text}"
            return resp.status, parsed


@pytest.fixture
async def controller_harness(tmp_path: Path) -> AsyncIterator[ControllerHarness]:
    harness = ControllerHarness(tmp_path / "data")
    await harness.start()
    try:
        yield harness
    finally:
        await harness.close()
