"""Shared fixtures.

Controller tests: `controller_harness` runs the real controller in-process
(REST, the gRPC enrollment endpoint and the mutual-TLS agent endpoint on free
ports of 127.0.0.1) on a temporary SQLite file, with an API client for the
bootstrap admin and a compute environment ready. `tests.fake_agent.FakeAgent`
enrolls with the bootstrap join token (`agent_token`) at `grpc_target`.

`postgres_url`: STUDIOS_TEST_POSTGRES_URL when set (scripts/test sets it as root), else,
as root, a throw-away PostgreSQL that this test session starts and stops; elsewhere the
tests that need it skip through `tests.integration.require`.

Every response the harness sees is checked against `controller/openapi.yaml`
(`check_response`): the path and method must be documented, the status must be
one of the operation's responses, and a JSON body must validate against its
schema; where Seqera's reference has the operation, the body must validate
against the reference's schema too (`tests.api_contract`, issue 14). A test that
provokes an undocumented answer fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controller.app import Controller
from controller.config import ControllerConfig
from tests import api_contract
from tests.integration import require

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = api_contract.OWN_SPEC_PATH
# Every (method, path template, status) the controller tests saw.
SEEN: set[tuple[str, str, int]] = set()


def check_response(method: str, path: str, status: int, content_type: str, body: Any) -> None:
    """Assert that the answer is one `controller/openapi.yaml` and, where it has the
    operation, the reference documents (`tests.api_contract`)."""
    checked = api_contract.check_response(method, path, status, content_type, body)
    SEEN.add((method.upper(), checked.template, status))


class ControllerHarness:
    def __init__(
        self,
        data_dir: Path,
        database_url: str | None = None,
        *,
        agent_cert_lifetime_seconds: float | None = None,
        templates_file: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        self.agent_cert_lifetime_seconds = agent_cert_lifetime_seconds
        # The template catalogue (None: the packaged one).
        self.templates_file = templates_file
        self.controller: Controller | None = None
        self.http: aiohttp.ClientSession | None = None
        self.compute_env_id = ""

    @property
    def url(self) -> str:
        assert self.controller is not None
        return f"http://127.0.0.1:{self.controller.http_port}"

    @property
    def grpc_target(self) -> str:
        """The enrollment endpoint (server TLS)."""
        assert self.controller is not None
        return f"127.0.0.1:{self.controller.grpc_port}"

    @property
    def grpc_agents_target(self) -> str:
        """The agent endpoint (mutual TLS)."""
        assert self.controller is not None
        return f"127.0.0.1:{self.controller.grpc_agents_port}"

    @property
    def ca_pem(self) -> bytes:
        assert self.controller is not None
        return self.controller.ca_certificate_pem

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
            grpc_agents_port=0,
            database_url=self.database_url,
            reconcile_interval_seconds=0.2,
            templates_file=self.templates_file,
        )
        if self.agent_cert_lifetime_seconds is not None:
            config.agent_cert_lifetime_seconds = self.agent_cert_lifetime_seconds
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
            check_response(method, path, resp.status, resp.content_type, parsed)
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


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server where the user may CREATE DATABASE, as a SQLAlchemy URL."""
    url = os.environ.get("STUDIOS_TEST_POSTGRES_URL", "")
    if url:
        yield url
        return
    require(
        os.geteuid() == 0,
        "STUDIOS_TEST_POSTGRES_URL is not set and starting a throw-away PostgreSQL needs "
        'root (or: eval "$(sudo scripts/test-postgres start)")',
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Not under pytest's own temporary directory: its parents are closed to the
    # `postgres` user the server runs as.
    data_dir = Path(f"/tmp/studios-test-postgres-{secrets.token_hex(4)}")
    env = {
        **os.environ,
        "STUDIOS_TEST_POSTGRES_DIR": str(data_dir),
        "STUDIOS_TEST_POSTGRES_PORT": str(port),
    }
    tool = str(ROOT / "scripts" / "test-postgres")
    out = subprocess.run(
        [tool, "start"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    try:
        require(
            out.returncode == 0,
            f"a throw-away PostgreSQL could not be started: {out.stderr.strip()}",
        )
        yield out.stdout.strip().partition("=")[2]
    finally:
        subprocess.run([tool, "stop"], env=env, capture_output=True, timeout=60, check=False)
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
async def postgres_database(postgres_url: str) -> AsyncIterator[str]:
    """A new, empty database on the `postgres_url` server (a SQLAlchemy URL), dropped after."""
    import asyncpg
    from sqlalchemy.engine import make_url

    from controller.config import normalize_database_url

    base = make_url(normalize_database_url(postgres_url))
    name = f"studios_test_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(
        host=base.host,
        port=base.port or 5432,
        user=base.username,
        password=base.password,
        database=base.database or "postgres",
    )
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.set(database=name).render_as_string(False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
