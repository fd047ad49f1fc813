"""Benchmark (JSON): the project's studio images (issue 15), every template.

- create -> the tool answering through the proxy, for each template (jupyterlab, code-server,
  r-ide, xpra): a real agent (podman runtime, xfs-loop volume, fake controller) is told to
  run the catalogue's template; the time from the desired state's push to the first 200 of
  the tool's own page through the agent's connect proxy (JupyterLab `/api/status`,
  code-server `/healthz`, the R IDE's `/lab`, Xpra's HTML5 client `/`); and stop -> stopped;
- against, in the same run and interleaved with it: a bare `podman run -d` of the same image
  to the first 200 of the same path on its published port (with the secret and user headers
  the proxy sends), and for JupyterLab JupyterHub spawning JupyterLab through
  configurable-http-proxy (tests/bench/anchor_jupyterhub.py; its setup is separate:
  `python3 tests/bench/anchor_jupyterhub.py --setup`); `ratio_*` fields = ours / anchor;
- image sizes: podman's size and each image's own bytes over its parent;
- build times: warm (`images build` of every image with nothing changed) always; cold
  (`--cold IMAGE...`) on request, in a temporary podman storage with no layer cache (the
  shared localhost/studios/* images are not rebuilt, retagged or removed).

Run as root after scripts/podman-setup (the images built; when no podman service answers on
the socket, the run starts one of its own on a private socket and stops it afterwards):
    .venv/bin/python tests/bench/bench_images.py [--runs 3] [--cold jupyterlab ...]

Measured (2026-12-01, `--runs 3 --cold jupyterlab`, 617 s; 2 cores shared with 4 other
engineers' test runs, load average 7.2 at the start and 6.1 at the end, so every figure is
noisy). Create -> answering through the proxy, median (min-max), against a bare `podman run`
of the same image: JupyterLab 15.0 s (3.9-19.2) vs 12.0 s (8.1-12.8), 1.25x, and JupyterHub
spawning JupyterLab through configurable-http-proxy 13.5 s (11.6-23.9), 1.11x; code-server
4.6 s (3.6-5.2) vs 4.6 s (3.2-4.7), 1.01x; R-IDE 13.6 s (11.5-14.8) vs 19.0 s (9.7-22.7),
0.72x; Xpra 7.7 s (4.1-10.9) vs 4.3 s (2.2-8.1), 1.80x. At that load the spread of three runs
is wider than the differences (R-IDE came out faster than its bare run): the tools' own start
dominates, and the agent's part (volume, overlay, network, proxy) is not separable from the
noise; re-measure on a quiet host before quoting a ratio. Stop -> stopped: JupyterLab 2.6 s
(JupyterHub 3.8 s), code-server 1.0 s, R-IDE 3.6 s, Xpra 1.2 s. Sizes, podman's / own over
the parent: base 178 / 178 MB, jupyterlab 397 / 218 MB (the anchor's venv with JupyterHub
and JupyterLab: 337 MB), r-ide 595 / 198 MB (over jupyterlab), code-server 847 / 669 MB,
xpra 872 / 693 MB. Builds: warm 0.9 s for all five (nothing built); cold jupyterlab 204 s
(pip from PyPI under that load), in a temporary podman storage over a copied base (the copy,
10 s, not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script: the repository's `tests` package (the fake controller) on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import aiohttp

from agent.images.definitions import default_definitions_dir, load_definitions
from tests.bench import anchor_jupyterhub
from tests.bench.image_bench_support import (
    DEFAULT_SOCKET,
    TARGETS,
    bare_podman_run,
    cold_builds,
    create_through_the_proxy,
    image_sizes,
    podman_agent,
    podman_service,
    summary,
    warm_build,
)


def _ratio(ours: float, anchor: float) -> float:
    return round(ours / anchor, 2) if anchor > 0 else 0.0


async def starts(
    runs: int, references: dict[str, str], podman_socket: Path, scratch: Path
) -> dict[str, dict[str, object]]:
    """Per template: through the proxy and a bare podman run, one after the other in each
    round, so that the host's changing load weighs on both alike."""
    ours: dict[str, list[float]] = {t.name: [] for t in TARGETS}
    stops: dict[str, list[float]] = {t.name: [] for t in TARGETS}
    bare: dict[str, list[float]] = {t.name: [] for t in TARGETS}
    errors: dict[str, list[str]] = {t.name: [] for t in TARGETS}
    async with (
        podman_agent(scratch, podman_socket) as (agent, controller),
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as http,
    ):
        for i in range(runs):
            for t_index, target in enumerate(TARGETS):
                sid = f"be{t_index:02x}{i:04x}"
                try:
                    answered, stopped = await create_through_the_proxy(
                        agent, controller, http, target, sid
                    )
                    ours[target.name].append(answered)
                    stops[target.name].append(stopped)
                except (TimeoutError, RuntimeError, AssertionError, aiohttp.ClientError) as exc:
                    errors[target.name].append(f"through the proxy, run {i + 1}: {exc}")
                try:
                    bare[target.name].append(
                        await bare_podman_run(http, target, references[target.name])
                    )
                except (TimeoutError, RuntimeError, aiohttp.ClientError) as exc:
                    errors[target.name].append(f"bare podman run, run {i + 1}: {exc}")
    out: dict[str, dict[str, object]] = {}
    for target in TARGETS:
        name = target.name
        row: dict[str, object] = {"template": target.template, "path": target.path}
        if ours[name]:
            row["create_to_answer_through_proxy"] = summary(ours[name])
            row["stop_to_stopped"] = summary(stops[name])
        if bare[name]:
            row["anchor_bare_podman_run_to_answer"] = summary(bare[name])
        if ours[name] and bare[name]:
            row["ratio_to_bare_podman_run"] = _ratio(
                summary(ours[name])["median_s"], summary(bare[name])["median_s"]
            )
        if errors[name]:
            row["errors"] = errors[name]
        out[name] = row
    return out


async def jupyterhub_anchor(runs: int) -> dict[str, object]:
    if not anchor_jupyterhub.available():
        return {
            "available": False,
            "setup": (
                "python3 tests/bench/anchor_jupyterhub.py --setup (pip installs jupyterhub and "
                f"jupyterlab into {anchor_jupyterhub.VENV}, npm configurable-http-proxy into "
                f"{anchor_jupyterhub.CHP_PREFIX}; STUDIOS_BENCH_JHUB_VENV and "
                "STUDIOS_BENCH_CHP_PREFIX move them)"
            ),
        }
    try:
        return await anchor_jupyterhub.measure_jupyterhub(runs)
    except (AssertionError, OSError, TimeoutError, aiohttp.ClientError) as exc:
        return {"available": True, "error": f"JupyterHub anchor failed: {exc!r}"}


def _du_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=False)
    return round(int(out.stdout.split()[0]) / 1e6, 1) if out.returncode == 0 else 0.0


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--cold",
        nargs="+",
        default=[],
        metavar="IMAGE",
        help="also build these images (and what is FROM them among them) without a layer "
        "cache, in a temporary podman storage",
    )
    parser.add_argument(
        "--podman-socket",
        type=Path,
        default=DEFAULT_SOCKET,
        help="podman's REST API for the agent (default $STUDIOS_PODMAN_SOCKET or "
        "/run/podman/podman.sock); when nothing answers there, the run starts its own",
    )
    args = parser.parse_args()
    definitions = load_definitions(default_definitions_dir())
    unknown = sorted(set(args.cold) - set(definitions))
    if unknown:
        parser.error(f"--cold: no image definition named {', '.join(unknown)}")
    report: dict[str, object] = {
        "runs": args.runs,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    t0 = time.monotonic()
    builds: dict[str, object] = {"warm": warm_build(definitions)}
    if args.cold:
        builds["cold"] = cold_builds(definitions, args.cold)
    report["builds"] = builds

    sizes = image_sizes(definitions)
    references = {t.name: definitions[t.name].reference for t in TARGETS}
    with (
        tempfile.TemporaryDirectory(dir="/var/tmp", prefix="bench-images-") as tmp,
        podman_service(args.podman_socket, Path(tmp)) as (socket, service),
    ):
        report["podman_service"] = service
        agent_dir = Path(tmp) / "agent"
        agent_dir.mkdir()
        templates = await starts(args.runs, references, socket, agent_dir)
    hub = await jupyterhub_anchor(args.runs)
    lab = templates["jupyterlab"]
    hub_median = hub.get("start_median_s")
    lab_start = lab.get("create_to_answer_through_proxy")
    lab["anchor_jupyterhub_spawn_to_api_status"] = hub
    if isinstance(hub_median, float) and isinstance(lab_start, dict):
        lab["ratio_to_jupyterhub"] = _ratio(lab_start["median_s"], hub_median)
    if anchor_jupyterhub.available():
        # What JupyterHub's way costs on disk: the anchor's venv (JupyterHub + JupyterLab).
        venv_mb = _du_mb(anchor_jupyterhub.VENV)
        own = sizes.get("jupyterlab", {}).get("own_mb")
        sizes["jupyterlab"]["anchor_jupyterhub_venv_mb"] = venv_mb
        if isinstance(own, float):
            sizes["jupyterlab"]["ratio_own_to_jupyterhub_venv"] = _ratio(own, venv_mb)
    report["starts"] = templates
    report["sizes"] = sizes
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except RuntimeError as exc:
        # What stops the whole run (no podman service, an image that cannot be copied for a
        # cold build): named, without a stack trace.
        print(json.dumps({"error": str(exc)}, indent=2))
        sys.exit(1)
