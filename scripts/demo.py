"""The quick start's main job: a controller, an agent and a sample studio on embedded defaults.

Starts `studio-controller serve` and `studio-agent serve` (local runtime) as child processes
with their state in `.quickstart/`, creates a compute environment and a studio named `sample`
(or reuses them on a second run), waits until it runs and prints where to open it. Ctrl-C
stops the studio (its checkpoint is written), then the agent and the controller.

    scripts/quickstart            # install, then this
    .venv/bin/python scripts/demo.py --check   # start, verify the page, stop, exit (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e_harness import AgentProcess, ControllerProcess, RestClient  # noqa: E402

STATE = ROOT / ".quickstart"
TEMPLATE = "studios/python-http:3.11-0.1"


async def ensure_compute_env(api: RestClient) -> str:
    _, body = await api.request("GET", "/compute-envs", expect=200)
    for env in body["computeEnvs"]:
        if env["name"] == "quickstart":
            return str(env["id"])
    _, body = await api.request(
        "POST",
        "/compute-envs",
        {
            "computeEnv": {
                "name": "quickstart",
                "platform": "studio-agent",
                "config": {"workDir": str(STATE / "work"), "bootDiskSizeGb": 30},
            }
        },
        expect=200,
    )
    return str(body["computeEnvId"])


async def ensure_sample_studio(api: RestClient, compute_env_id: str) -> str:
    _, body = await api.request("GET", "/studios?search=sample", expect=200)
    for studio in body["studios"]:
        if studio["name"] == "sample":
            if studio["statusInfo"]["status"] in ("stopped", "errored"):
                await api.request("PUT", f"/studios/{studio['sessionId']}/start", {}, expect=200)
            return str(studio["sessionId"])
    _, body = await api.request(
        "POST",
        "/studios",
        {"name": "sample", "computeEnvId": compute_env_id, "dataStudioToolUrl": TEMPLATE},
        expect=200,
    )
    return str(body["studio"]["sessionId"])


async def main(check: bool) -> int:
    controller = ControllerProcess(STATE / "controller", http_port=8080, grpc_port=8081)
    controller.start()
    agent: AgentProcess | None = None
    api: RestClient | None = None
    try:
        await controller.wait_ready()
        api = RestClient(controller.url, controller.admin_token)
        compute_env_id = await ensure_compute_env(api)
        agent = AgentProcess(controller, compute_env_id, STATE / "agent", proxy_port=7070)
        agent.start()
        sid = await ensure_sample_studio(api, compute_env_id)
        studio = await api.wait_status(sid, {"running", "errored"}, timeout=120)
        if studio["statusInfo"]["status"] != "running":
            print(f"the sample studio failed: {studio['statusInfo']['message']}", file=sys.stderr)
            return 1
        async with api.http.get(
            studio["studioUrl"],
            headers={"Authorization": f"Bearer {api.token}"},
            allow_redirects=False,
        ) as resp:
            browser_link = resp.headers.get("Location", "")
        token_file = controller.data_dir / "admin-token"
        print(
            f"""
Studios is running.
  controller API   {controller.url}   (token: {token_file})
  agent            {agent.state_dir}   (studio-agent sessions --state-dir {agent.state_dir})
  sample studio    {studio["studioUrl"]}

Open in a browser now (single use, valid 60 s):
  {browser_link}
A fresh link at any time: open the sample studio's URL above in the browser and sign in
with the token in {token_file}, or
  curl -s -o /dev/null -w '%{{redirect_url}}\\n' -H "Authorization: Bearer $(cat {token_file})" \\
    {studio["studioUrl"]}

Ctrl-C stops the studio (its checkpoint is kept), the agent and the controller.""",
            flush=True,
        )
        if check:
            async with api.http.get(browser_link) as resp:
                page = await resp.text()
                if resp.status != 200 or "Directory listing" not in page:
                    print(f"the sample studio's page failed: {resp.status}", file=sys.stderr)
                    return 1
            print("check: the sample studio's page answers through the proxy")
        else:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        print("stopping the sample studio (writing its checkpoint) ...", flush=True)
        await api.request("PUT", f"/studios/{sid}/stop", expect=200)
        await api.wait_status(sid, {"stopped", "errored"}, timeout=120)
        return 0
    finally:
        if api is not None:
            await api.close()
        if agent is not None:
            agent.stop()
        controller.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="start, verify, stop and exit")
    sys.exit(asyncio.run(main(parser.parse_args().check)))
