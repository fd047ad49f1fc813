"""The JupyterHub anchor: spawn → JupyterLab answering through configurable-http-proxy.

JupyterHub with SimpleLocalProcessSpawner and configurable-http-proxy, as in ANCHORS.md. The
hub and the proxy come from a separate virtual environment and npm prefix (set up once with
`--setup`, they are not project dependencies):

    python3 tests/bench/anchor_jupyterhub.py --setup   # /tmp/jhub-venv, /tmp/chp
    python3 tests/bench/anchor_jupyterhub.py --runs 5  # prints JSON
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

__all__ = ["available", "measure_jupyterhub", "setup"]

VENV = Path(os.environ.get("STUDIOS_BENCH_JHUB_VENV", "/tmp/jhub-venv"))
CHP_PREFIX = Path(os.environ.get("STUDIOS_BENCH_CHP_PREFIX", "/tmp/chp"))
CHP = CHP_PREFIX / "node_modules/.bin/configurable-http-proxy"


def available() -> bool:
    return (VENV / "bin/jupyterhub").exists() and CHP.exists()


def setup() -> None:
    if not (VENV / "bin/jupyterhub").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(VENV / "bin/pip"), "install", "-q", "jupyterhub", "jupyterlab"], check=True
        )
    if not CHP.exists():
        CHP_PREFIX.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--silent", "--prefix", str(CHP_PREFIX), "configurable-http-proxy"],
            check=True,
        )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# A spawn that never answers (a broken setup) ends the measurement instead of hanging it.
DEADLINE_S = 180.0
LOG = Path(tempfile.gettempdir()) / "jhub-anchor.log"


def _check_deadline(t0: float, what: str) -> None:
    if time.perf_counter() - t0 > DEADLINE_S:
        raise TimeoutError(f"{what} in {DEADLINE_S:g} s; the hub's log: {LOG}")


async def measure_jupyterhub(runs: int) -> dict[str, object]:
    token = secrets.token_hex(16)
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="jhub-anchor-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "home").mkdir()
        config = tmp / "jupyterhub_config.py"
        config.write_text(
            f"""
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = {str(tmp / "home" / "{username}")!r}
c.Spawner.cmd = [{str(VENV / "bin/jupyterhub-singleuser")!r}]
c.Spawner.default_url = "/lab"
# The benchmark machine runs as root, as CI does.
c.Spawner.args = ["--allow-root"]
c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{_free_port()}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{_free_port()}"
c.ConfigurableHTTPProxy.command = [{str(CHP)!r}]
c.JupyterHub.db_url = "sqlite:///{tmp / "hub.sqlite"}"
c.JupyterHub.cookie_secret_file = {str(tmp / "cookie_secret")!r}
c.JupyterHub.services = [{{"name": "bench", "api_token": {token!r}}}]
c.JupyterHub.load_roles = [{{"name": "bench", "services": ["bench"],
    "scopes": ["admin:users", "admin:servers", "access:servers"]}}]
"""
        )
        env = {**os.environ, "PATH": f"{VENV / 'bin'}:{CHP.parent}:{os.environ['PATH']}"}
        hub = subprocess.Popen(
            [str(VENV / "bin/jupyterhub"), "-f", str(config)],
            cwd=tmp,
            env=env,
            stdout=open(LOG, "wb"),
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"token {token}"}
        starts: list[float] = []
        stops: list[float] = []
        try:
            async with aiohttp.ClientSession(headers=headers) as http:
                for _ in range(600):
                    try:
                        async with http.get(f"{base}/hub/api/") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
                for i in range(runs):
                    user = f"bench{i}"
                    async with http.post(f"{base}/hub/api/users/{user}") as resp:
                        assert resp.status in (201, 409), await resp.text()
                    t0 = time.perf_counter()
                    async with http.post(f"{base}/hub/api/users/{user}/server") as resp:
                        assert resp.status in (201, 202), await resp.text()
                    while True:
                        async with http.get(
                            f"{base}/user/{user}/api/status", allow_redirects=False
                        ) as resp:
                            if resp.status == 200:
                                break
                        _check_deadline(t0, f"{user}'s JupyterLab did not answer")
                        await asyncio.sleep(0.05)
                    starts.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    async with http.delete(f"{base}/hub/api/users/{user}/server") as resp:
                        assert resp.status in (202, 204), await resp.text()
                    while True:
                        async with http.get(f"{base}/hub/api/users/{user}") as resp:
                            model = await resp.json()
                        if not model.get("servers") and model.get("pending") is None:
                            break
                        _check_deadline(t0, f"{user}'s server did not stop")
                        await asyncio.sleep(0.05)
                    stops.append(time.perf_counter() - t0)
        finally:
            hub.terminate()
            try:
                hub.wait(timeout=20)
            except subprocess.TimeoutExpired:
                hub.kill()
            shutil.rmtree(tmp / "home", ignore_errors=True)
    return {
        "name": "JupyterHub SimpleLocalProcessSpawner + configurable-http-proxy (measured now)",
        "start_median_s": round(statistics.median(starts), 3),
        "start_all_s": [round(s, 3) for s in starts],
        "stop_median_s": round(statistics.median(stops), 3),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.setup:
        setup()
    else:
        print(json.dumps(asyncio.run(measure_jupyterhub(args.runs)), indent=2))
