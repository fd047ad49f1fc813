"""Two (or more) real controllers on one PostgreSQL behind a real nginx, for the e2e
tests and the benchmark of several controllers (issue 16).

Everything is started as an operator would: `studio-controller serve` processes sharing
`--database` and `--secrets-key-file`, the second given the first's admin and agent token
files (the database knows the tokens, hashed; the files are what an operator copies), and
Debian's nginx in front of their HTTP with the configuration README "Operating" shows
(written from `NGINX_CONF`, with this run's ports and paths). Agents are given every
controller's enrollment endpoint (`--controller A,B`): gRPC does not go through nginx.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import aiohttp

from tests.e2e_harness import ControllerProcess, free_port
from tests.integration import require

__all__ = ["NGINX_CONF", "Cluster", "Nginx", "require_cluster_tools"]

# The configuration README "Operating" shows, with {placeholders} for a test run.
NGINX_CONF = """\
{user}worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    upstream studio_controllers {{
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://studio_controllers;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            # Long-polling (GET /studios/{{id}}?wait=...) holds a request open.
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
            # A controller that is down: the next one answers. (Not `non_idempotent`:
            # a POST a controller took before dying is not sent twice.)
            proxy_next_upstream error timeout http_502 http_503;
            proxy_connect_timeout 2s;
            client_max_body_size 16m;
        }}
    }}
}}
"""


def require_cluster_tools() -> None:
    """Skip (fail in CI) without nginx or root; the PostgreSQL fixture says why itself."""
    require(shutil.which("nginx") is not None, "nginx is not installed (apt-get install nginx)")
    require(
        os.geteuid() == 0,
        "the agents run local tools as the 'agent' user, which needs root",
    )


class Nginx:
    """Debian's nginx in the foreground with a configuration of its own under `prefix`."""

    def __init__(self, prefix: Path, upstreams: Sequence[str], port: int | None = None) -> None:
        self.prefix = prefix
        self.port = port or free_port()
        self.upstreams = list(upstreams)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        servers = "\n".join(
            f"        server {u} max_fails=1 fail_timeout=5s;" for u in self.upstreams
        )
        conf = self.prefix / "nginx.conf"
        # Workers as root too: their temporary files go under the test's own (0700) tree.
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf.write_text(
            NGINX_CONF.format(user=user, prefix=self.prefix, port=self.port, servers=servers)
        )
        with open(self.prefix / "stderr.log", "ab") as stderr:
            self.proc = subprocess.Popen(
                ["nginx", "-p", str(self.prefix), "-c", str(conf), "-g", "daemon off;"],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
            )

    async def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.log_tail()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise TimeoutError(f"nginx not listening after {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        out = []
        for name in ("stderr.log", "error.log"):
            path = self.prefix / name
            if path.exists():
                out.append(path.read_text(errors="replace")[-2000:])
        return "\n".join(out)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


class Cluster:
    """`count` controllers on `database` sharing one secrets key, and nginx before them."""

    def __init__(
        self,
        tmp: Path,
        database: str,
        *,
        count: int = 2,
        extra_args: Iterable[str] = (),
        grpc_hosts: Sequence[str] | None = None,
    ) -> None:
        """`grpc_hosts`: each controller's gRPC address (one per controller), all on one
        enrollment port and one agent port: what a DNS name with several addresses leads
        to, one controller behind each. Default: each on 127.0.0.1, on ports of its own."""
        self.tmp = tmp
        self.key_file = tmp / "secrets-key"
        self.nginx_port = free_port()
        args = [
            "--secrets-key-file",
            str(self.key_file),
            "--public-url",
            f"http://127.0.0.1:{self.nginx_port}",
            *extra_args,
        ]
        if grpc_hosts is not None and len(grpc_hosts) != count:
            raise ValueError(f"grpc_hosts: {count} addresses expected, got {list(grpc_hosts)}")
        self.grpc_port, self.grpc_agents_port = free_port(), free_port()
        self.controllers = [
            ControllerProcess(
                tmp / f"controller-{chr(ord('a') + i)}",
                database=database,
                extra_args=[*args, *self._grpc_args(grpc_hosts[i] if grpc_hosts else None)],
            )
            for i in range(count)
        ]
        self.nginx = Nginx(
            tmp / "nginx", [f"127.0.0.1:{c.http_port}" for c in self.controllers], self.nginx_port
        )

    def _grpc_args(self, host: str | None) -> list[str]:
        if host is None:
            return []
        shown = f"[{host}]" if ":" in host else host
        # After ControllerProcess's own --grpc and --grpc-agents: the last one counts.
        return [
            "--grpc",
            f"{shown}:{self.grpc_port}",
            "--grpc-agents",
            f"{shown}:{self.grpc_agents_port}",
        ]

    @property
    def agent_controllers(self) -> str:
        """What `studio-agent serve --controller` is given: every enrollment endpoint."""
        return ",".join(c.grpc_address for c in self.controllers)

    async def start(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        # As README "Operating" says: one key, made once, given to every controller.
        self.key_file.write_text(secrets.token_hex(32) + "\n")
        self.key_file.chmod(0o600)
        first = self.controllers[0]
        first.start()
        await first.wait_ready(timeout=90)
        for other in self.controllers[1:]:
            other.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            for name in ("admin-token", "agent-token"):
                shutil.copy2(first.data_dir / name, other.data_dir / name)
            other.start()
        for other in self.controllers[1:]:
            await other.wait_ready(timeout=90)
        self.nginx.start()
        await self.nginx.wait_ready()
        # Through nginx, as clients see it.
        async with aiohttp.ClientSession() as http:
            async with http.get(
                f"{self.nginx.url}/studios/templates",
                headers={"Authorization": f"Bearer {first.admin_token}"},
            ) as resp:
                assert resp.status == 200, await resp.text()

    def stop(self) -> None:
        self.nginx.stop()
        for controller in self.controllers:
            controller.stop()
