"""Two controllers on one PostgreSQL behind nginx (issue 16), all real processes.

A studio created through A and started through B runs on the agent connected to A with
the periodic resync off, so only the database notification reaches it; a browser that
signs in through A acts through B; connect works through either; when A is SIGKILLed its
agent moves to B and the session keeps serving throughout; the reconciler's shared pass
runs on one controller at a time, and moves when its holder dies. Delivery and failover
times are the benchmark's (tests/bench/bench_multi_controller.py), never asserted here.

`--controller` as one DNS name with several addresses: controller A's gRPC on 127.0.0.1,
B's on ::1, on the same ports; the agent, given `localhost:PORT` (both addresses in its
own view of /etc/hosts), connects to one, and when that one is SIGKILLed gRPC's resolver
takes it to the other address while its session keeps serving. The agent does not
resolve the name itself: gRPC tries every address of it on each new channel, and the
TLS name checked is the name dialled (the controllers' certificates name localhost).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
import pytest

from controller.notify import asyncpg_dsn
from tests.e2e_harness import AgentProcess, ControllerProcess, LocalhostResolver, RestClient
from tests.integration import require
from tests.multi_controller import Cluster, require_cluster_tools

pytestmark = pytest.mark.e2e

TEMPLATE = "studios/python-http:3.11-0.1"
# The resync off: what reaches an agent reached it through a notification.
BASE_ARGS = ("--resync-interval-seconds", "0")

ClusterFactory = Callable[[Iterable[str]], Awaitable[Cluster]]


@pytest.fixture
async def make_cluster(tmp_path: Path, postgres_database: str) -> AsyncIterator[ClusterFactory]:
    require_cluster_tools()
    made: list[Cluster] = []

    async def make(extra: Iterable[str]) -> Cluster:
        cluster = Cluster(tmp_path / "cluster", postgres_database, extra_args=[*BASE_ARGS, *extra])
        made.append(cluster)
        await cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.stop()


class Site:
    """A cluster with one compute environment and agents that know every controller."""

    def __init__(self, cluster: Cluster, tmp: Path) -> None:
        self.cluster = cluster
        self.tmp = tmp
        token = cluster.controllers[0].admin_token
        self.front = RestClient(cluster.nginx.url, token)
        self.direct = [RestClient(c.url, token) for c in cluster.controllers]
        self.agents: list[AgentProcess] = []
        self.compute_env_id = ""
        self.session_ids: list[str] = []

    async def setup(self) -> None:
        self.compute_env_id = await self.front.create_compute_env("local", self.tmp / "work")

    async def add_agent(self) -> AgentProcess:
        first = self.cluster.controllers[0]
        agent = AgentProcess(first, self.compute_env_id, self.tmp / f"agent{len(self.agents)}")
        # Every controller's enrollment endpoint, the first one first.
        agent.argv[agent.argv.index("--controller") + 1] = self.cluster.agent_controllers
        self.agents.append(agent)
        agent.start()
        return agent

    async def create(self, api: RestClient, name: str, *, auto_start: bool) -> str:
        path = "/studios" if auto_start else "/studios?autoStart=false"
        body = {"name": name, "computeEnvId": self.compute_env_id, "dataStudioToolUrl": TEMPLATE}
        _, answer = await api.request("POST", path, body, expect=200)
        sid = str(answer["studio"]["sessionId"])
        self.session_ids.append(sid)
        return sid

    async def close(self) -> None:
        for sid in self.session_ids:
            status, studio = await self.front.request("GET", f"/studios/{sid}")
            if status == 200 and studio["statusInfo"]["status"] in ("running", "starting"):
                await self.front.request("PUT", f"/studios/{sid}/stop")
                await self.front.wait_status(sid, {"stopped", "errored"}, timeout=60)
        for agent in self.agents:
            agent.stop()
        for api in (self.front, *self.direct):
            await api.close()


@pytest.fixture
async def site_factory(
    make_cluster: ClusterFactory, tmp_path: Path
) -> AsyncIterator[Callable[[Iterable[str]], Awaitable[Site]]]:
    sites: list[Site] = []

    async def make(extra: Iterable[str]) -> Site:
        site = Site(await make_cluster(extra), tmp_path)
        sites.append(site)
        await site.setup()
        return site

    try:
        yield make
    finally:
        for site in sites:
            await site.close()


def _link(agent: AgentProcess) -> dict[str, Any]:
    return dict(agent.cli("status")["controller"])


async def _until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        await asyncio.sleep(0.1)


async def _connected_through(api: RestClient) -> bool:
    _, body = await api.request("GET", "/agents", expect=200)
    return any(a["connected"] for a in body["agents"])


async def _on(agent: AgentProcess, controller: ControllerProcess) -> bool:
    try:
        link = await asyncio.to_thread(_link, agent)
    except subprocess.CalledProcessError:
        return False  # its admin socket is not up yet
    return bool(link["connected"]) and link["address"] == controller.grpc_address


def _browser() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=LocalhostResolver()),
        cookie_jar=aiohttp.CookieJar(unsafe=True),
    )


async def _open_through(browser: aiohttp.ClientSession, base: str, sid: str, token: str) -> str:
    """GET /studios/{sid}/connect at `base` (a controller or nginx), follow the proxy's
    token to its cookie: the tool's URL."""
    async with browser.get(
        f"{base}/studios/{sid}/connect",
        headers={"Authorization": f"Bearer {token}"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 302, f"connect through {base}: {resp.status} {await resp.text()}"
        location = resp.headers["Location"]
    async with browser.get(location) as resp:
        assert resp.status == 200, await resp.text()
        assert "Directory listing" in await resp.text()
        return str(resp.url).split("?")[0]


async def test_a_change_through_b_reaches_the_agent_connected_to_a(
    site_factory: Callable[[Iterable[str]], Awaitable[Site]],
) -> None:
    # No periodic pass either: nothing but the start request itself places the studio.
    site = await site_factory(["--reconcile-interval-seconds", "3600"])
    a = site.cluster.controllers[0]
    api_a, api_b = site.direct
    agent = await site.add_agent()
    await _until("the agent is on A", lambda: _on(agent, a))
    # B has no stream of it, yet knows it is connected (its lease in the database).
    await _until("B lists the agent connected", lambda: _connected_through(api_b), 15)

    sid = await site.create(api_a, "made through A", auto_start=False)
    # A long-poll on B: A commits `running` (it holds the agent's stream), and B's waiter
    # wakes through the database's notifications, not at its 60 s timeout.
    waited = time.monotonic()
    poll = asyncio.create_task(
        api_b.request("GET", f"/studios/{sid}?workspaceId=1&wait=running&timeout=60", expect=200)
    )
    await api_b.request("PUT", f"/studios/{sid}/start", {}, expect=200)
    studio = await api_a.wait_status(sid, {"running", "errored"}, timeout=60)
    assert studio["statusInfo"]["status"] == "running", studio
    assert await _on(agent, a), "the agent moved: the test would not prove the notification"
    _, polled = await poll
    assert polled["statusInfo"]["status"] == "running", polled
    assert time.monotonic() - waited < 50, "B's long-poll was not woken by A's commit"

    await api_b.request("PUT", f"/studios/{sid}/stop", expect=200)
    studio = await api_a.wait_status(sid, {"stopped", "errored"}, timeout=60)
    assert studio["statusInfo"]["status"] == "stopped", studio


async def test_sign_in_through_a_act_and_connect_through_either(
    site_factory: Callable[[Iterable[str]], Awaitable[Site]],
) -> None:
    site = await site_factory([])
    a, b = site.cluster.controllers
    token = a.admin_token
    agent = await site.add_agent()
    await _until("the agent is on A", lambda: _on(agent, a))
    sid = await site.create(site.front, "through nginx", auto_start=True)
    studio = await site.front.wait_status(sid, {"running", "errored"}, timeout=60)
    assert studio["statusInfo"]["status"] == "running", studio
    # studioUrl names the public URL: nginx.
    assert studio["studioUrl"].startswith(site.cluster.nginx.url), studio["studioUrl"]

    async with _browser() as browser:
        async with browser.post(f"{a.url}/auth/sign-in", json={"token": token}) as resp:
            assert resp.status == 200, await resp.text()
        # The cookie A set, and nothing else, at B.
        async with browser.get(f"{b.url}/studios/{sid}?workspaceId=1") as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["sessionId"] == sid

    for base in (a.url, b.url, site.cluster.nginx.url):
        async with _browser() as browser:
            await _open_through(browser, base, sid, token)


async def test_killing_a_moves_its_agent_to_b_and_the_session_keeps_serving(
    site_factory: Callable[[Iterable[str]], Awaitable[Site]],
) -> None:
    site = await site_factory([])
    a, b = site.cluster.controllers
    token = a.admin_token
    agent = await site.add_agent()
    await _until("the agent is on A", lambda: _on(agent, a))
    sid = await site.create(site.front, "survives A", auto_start=True)
    studio = await site.front.wait_status(sid, {"running", "errored"}, timeout=60)
    assert studio["statusInfo"]["status"] == "running", studio

    async with _browser() as browser:
        tool = await _open_through(browser, site.cluster.nginx.url, sid, token)
        a.kill()
        # The tool answers throughout, through the agent's proxy, with the cookie it has.
        deadline = time.monotonic() + 60
        while True:
            async with browser.get(tool) as resp:
                assert resp.status == 200, await resp.text()
            if await _on(agent, b):
                break
            assert time.monotonic() < deadline, f"the agent did not move to B:\n{agent.log_tail()}"
            await asyncio.sleep(0.2)
        assert agent.alive()
        async with browser.get(tool) as resp:
            assert resp.status == 200

    # nginx sends everything to B now; the studio never stopped.
    studio = await site.front.wait_status(sid, "running", timeout=10)
    async with _browser() as browser:
        await _open_through(browser, site.cluster.nginx.url, sid, token)
    await site.front.request("PUT", f"/studios/{sid}/stop", expect=200)
    studio = await site.front.wait_status(sid, {"stopped", "errored"}, timeout=60)
    assert studio["statusInfo"]["status"] == "stopped", studio


async def _lease(dsn: str, name: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(dsn)
    try:
        row: asyncpg.Record | None = await conn.fetchrow(
            "SELECT holder, generation, passes FROM job_leases WHERE name = $1", name
        )
        return row
    finally:
        await conn.close()


async def test_background_jobs_run_on_one_controller_and_move_when_it_dies(
    site_factory: Callable[[Iterable[str]], Awaitable[Site]], postgres_database: str
) -> None:
    interval, lease = 0.2, 4.0
    site = await site_factory(
        ["--reconcile-interval-seconds", str(interval), "--job-lease-seconds", str(lease)]
    )
    dsn = asyncpg_dsn(postgres_database)
    controllers = site.cluster.controllers

    async def held() -> bool:
        return await _lease(dsn, "reconciler") is not None

    await _until("a controller holds the reconciler", held, 15)
    await asyncio.sleep(1.0)
    first = await _lease(dsn, "reconciler")
    assert first is not None
    window = 4.0
    await asyncio.sleep(window)
    second = await _lease(dsn, "reconciler")
    assert second is not None
    # One controller's worth of passes: two controllers each running every `interval`
    # would count about twice as many. (The job may move if its holder stalls longer
    # than the lease on a busy host; it never runs on both at once.)
    passes = second["passes"] - first["passes"]
    assert 0 < passes <= window / interval + 3, passes

    # The holder is the controller whose pid its id names (host-pid-random).
    holder = next(c for c in controllers if c.proc and f"-{c.proc.pid}-" in str(second["holder"]))
    other = next(c for c in controllers if c is not holder)
    holder.kill()

    async def moved() -> bool:
        row = await _lease(dsn, "reconciler")
        return row is not None and row["generation"] > second["generation"]

    await _until("the other controller takes the reconciler", moved, lease * 5)
    taken = await _lease(dsn, "reconciler")
    assert taken is not None and f"-{other.proc.pid}-" in str(taken["holder"])  # type: ignore[union-attr]
    await asyncio.sleep(1.0)
    after = await _lease(dsn, "reconciler")
    assert after is not None and after["passes"] > taken["passes"]


# ------------------------------------------------- --controller as a DNS name, several addresses

# The agent's own view of /etc/hosts (a private mount namespace, as a container would give
# it): `localhost` with both loopback addresses, as many systems have it. This host's
# /etc/hosts has 127.0.0.1 only, and is left alone.
HOSTS = "127.0.0.1 localhost\n::1 localhost\n"


def _with_hosts_file(agent: AgentProcess, hosts: Path) -> None:
    """Run the agent in a mount namespace of its own whose /etc/hosts is `hosts`."""
    agent.argv[:0] = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount --bind "$0" /etc/hosts && exec "$@"',
        str(hosts),
    ]


def _peer_host(agent: AgentProcess, port: int) -> str | None:
    """The address the agent's established connection to `port` goes to (its stream)."""
    assert agent.proc is not None
    with contextlib.suppress(psutil.Error):
        for conn in psutil.Process(agent.proc.pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_ESTABLISHED and conn.raddr and conn.raddr.port == port:
                # gRPC dials IPv4 from IPv6 sockets too: ::ffff:127.0.0.1.
                return str(conn.raddr.ip).removeprefix("::ffff:")
    return None


@contextlib.asynccontextmanager
async def _agent_given_a_name(
    postgres_database: str, tmp_path: Path, name: str, hosts_text: str
) -> AsyncIterator[tuple[Cluster, Site, AgentProcess]]:
    """Controller A's gRPC on 127.0.0.1 and B's on ::1, on the same two ports, and a
    started agent given `--controller name:PORT`, its own /etc/hosts being `hosts_text`."""
    require_cluster_tools()
    require(shutil.which("unshare") is not None, "unshare (util-linux) is not installed")
    loopback6 = subprocess.run(
        ["ip", "-6", "addr", "show", "lo"], capture_output=True, text=True, check=False
    )
    require("::1/128" in loopback6.stdout, "::1 is not configured on lo")
    cluster = Cluster(
        tmp_path / "cluster",
        postgres_database,
        extra_args=BASE_ARGS,
        grpc_hosts=("127.0.0.1", "::1"),
    )
    await cluster.start()
    site = Site(cluster, tmp_path)
    try:
        await site.setup()
        hosts = tmp_path / "hosts"
        hosts.write_text(hosts_text)
        agent = AgentProcess(cluster.controllers[0], site.compute_env_id, tmp_path / "agent")
        agent.argv[agent.argv.index("--controller") + 1] = f"{name}:{cluster.grpc_port}"
        _with_hosts_file(agent, hosts)
        site.agents.append(agent)
        agent.start()
        yield cluster, site, agent
    finally:
        # Through the survivor: nginx holds no controller that is gone for long.
        await site.close()
        cluster.stop()


async def test_controller_as_a_name_with_two_addresses_fails_over(
    postgres_database: str, tmp_path: Path
) -> None:
    # A on 127.0.0.1, B on ::1, each on the same two gRPC ports: `localhost:PORT` is both.
    async with _agent_given_a_name(postgres_database, tmp_path, "localhost", HOSTS) as (
        cluster,
        site,
        agent,
    ):
        a, b = cluster.controllers
        by_address = {"127.0.0.1": a, "::1": b}

        async def on_one() -> bool:
            return _peer_host(agent, cluster.grpc_agents_port) in by_address

        await _until("the agent connects through localhost", on_one, 60)
        first = by_address[_peer_host(agent, cluster.grpc_agents_port) or ""]
        other = b if first is a else a
        # The name, not an address, is what the agent dials, and its TLS name check holds
        # for it (the controllers' certificates name localhost).
        link = await asyncio.to_thread(_link, agent)
        assert link["connected"] and link["address"] == f"localhost:{cluster.grpc_port}", link

        sid = await site.create(site.front, "survives its controller", auto_start=True)
        studio = await site.front.wait_status(sid, {"running", "errored"}, timeout=60)
        assert studio["statusInfo"]["status"] == "running", studio
        token = a.admin_token
        async with _browser() as browser:
            tool = await _open_through(browser, cluster.nginx.url, sid, token)
            first.kill()

            async def on_other() -> bool:
                async with browser.get(tool) as resp:
                    assert resp.status == 200, await resp.text()
                return by_address.get(_peer_host(agent, cluster.grpc_agents_port) or "") is other

            await _until(f"the agent moves to {other.data_dir.name}", on_other, 60)
            assert agent.alive()
            async with browser.get(tool) as resp:
                assert resp.status == 200
        link = await asyncio.to_thread(_link, agent)
        assert link["connected"], link
        api_other = site.direct[cluster.controllers.index(other)]
        await _until(
            "the surviving controller lists the agent", lambda: _connected_through(api_other), 30
        )
        studio = await api_other.wait_status(sid, "running", timeout=10)
        await api_other.request("PUT", f"/studios/{sid}/stop", expect=200)
        studio = await api_other.wait_status(sid, {"stopped", "errored"}, timeout=60)
        assert studio["statusInfo"]["status"] == "stopped", studio


async def test_controller_name_not_in_the_certificate_is_refused(
    postgres_database: str, tmp_path: Path
) -> None:
    """The TLS name check holds for a name with several addresses: a name the controllers'
    certificates do not carry (they were not given it with --grpc-advertise) is refused,
    whichever address the agent reaches, although the join token's CA pin matches."""
    hosts = "127.0.0.1 controllers.test\n::1 controllers.test\n"
    async with _agent_given_a_name(postgres_database, tmp_path, "controllers.test", hosts) as (
        _,
        site,
        agent,
    ):

        async def refused() -> bool:
            try:
                link = await asyncio.to_thread(_link, agent)
            except subprocess.CalledProcessError:
                return False
            return bool(link.get("lastError"))

        await _until("the agent reports why it cannot connect", refused, 60)
        link = await asyncio.to_thread(_link, agent)
        assert not link["connected"], link
        assert "certificate does not name controllers.test" in link["lastError"], link
        _, listing = await site.front.request("GET", "/agents", expect=200)
        assert listing["agents"] == [], listing
