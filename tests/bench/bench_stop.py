"""`PUT .../stop` → `stopped` with little changed, against restic's incremental backup.

The controller and one agent run as real processes (tests/e2e_harness.LocalStack, local
runtime, the agent's default volume kind: an XFS loop volume as root, else a directory;
`file://` checkpoint store below the compute environment's workDir). A studio of
`studios/python-http:3.11-0.1` holds a Python venv with numpy, pandas and scipy installed
(about 9,100 files, 330 MiB; built once with pip and cached, `--venv`). Each repetition:

  start → running, the run's first checkpoint complete (the restore of the previous run's
  final checkpoint is read back in full, as on every start) → change about 11 MiB (10 new
  1 MiB files, one file of about 1 MiB rewritten) → sync → `PUT /studios/{id}/stop`, polled
  every 20 ms until `stopped`.

The agent's log (millisecond timestamps) splits each stop into steps: the PUT until the
agent begins (controller, desired-state push), the tool's stop (SIGTERM, its exit seen,
data-links unmounted, handle saved), the final checkpoint as the agent logs it (engine,
checkpoint event persisted, handle saved), the volume's release until the agent logs
`stopped`, and from there until the API shows it. In the same run, on a copy of the same
tree in TMPDIR with the same changes: restic 0.14's incremental `restic backup` into a
local repository (the anchor, whole command as a user runs it), and the checkpoint engine
alone (agent/ckpt_engine.py, incremental against its previous checkpoint from the same
process, as the agent does). Medians over `--runs`; prints one JSON document.

    .venv/bin/python tests/bench/bench_stop.py [--runs 5] [--venv DIR] [--volume-kind KIND]
        [--profile DIR]   # py-spy profiles of the agent during each stop (pip install py-spy)
        [--no-anchor]     # the stops only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.checkpoints import engine as E
from tests.e2e_harness import LocalStack

MiB = 1024 * 1024
TEMPLATE = "studios/python-http:3.11-0.1"
POLL = 0.02
DEFAULT_VENV = Path(tempfile.gettempdir()) / "studios-bench-stop-venv"
RESTIC = "/usr/bin/restic"


def ensure_venv(where: Path) -> Path:
    """A venv with numpy+pandas+scipy, built once (pip, the machine's index) and reused."""
    if (where / "ok").exists():
        return where / "venv"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", "numpy", "pandas", "scipy"],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    (where / "ok").touch()
    return venv


def tree_stats(root: Path) -> tuple[int, int]:
    files = size = 0
    for dp, _, fns in os.walk(root):
        for fn in fns:
            st = os.lstat(os.path.join(dp, fn))
            if not os.path.islink(os.path.join(dp, fn)):
                files += 1
                size += st.st_size
    return files, size


def victims(root: Path, n: int) -> list[Path]:
    """`n` distinct regular files closest to 1 MiB, in a stable order (by path)."""
    found: list[tuple[int, str]] = []
    for dp, _, fns in os.walk(root):
        for fn in fns:
            p = os.path.join(dp, fn)
            if os.path.islink(p):
                continue
            found.append((abs(os.lstat(p).st_size - MiB), os.path.relpath(p, root)))
    found.sort()
    return [Path(rel) for _, rel in sorted(found[:n], key=lambda x: x[1])]


def mutate(root: Path, rep: int, victim: Path) -> int:
    """Ten new 1 MiB files and one existing ~1 MiB file rewritten; the changed bytes."""
    target = root / victim
    size = target.stat().st_size
    with open(target, "r+b") as f:
        f.write(os.urandom(size))
    new = root / f"bench-new-{rep}"
    new.mkdir()
    for i in range(10):
        (new / f"n{i}.bin").write_bytes(os.urandom(MiB))
    os.sync()
    return 10 * MiB + size


_LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def log_events(log: Path, sid: str, since: float) -> list[tuple[float, str]]:
    """(epoch seconds, message) of the agent's log lines about `sid` from `since` on."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = _LOG_TS.match(line)
        if not m or sid not in line:
            continue
        # asctime is local time with milliseconds.
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1e3
        if t >= since - 0.002:
            out.append((t, line[m.end() :]))
    return out


def split_stop(events: list[tuple[float, str]], t_put: float, t_stopped: float) -> dict[str, Any]:
    """Steps of one stop from the agent's log lines (seconds, rounded to ms)."""
    t_begin = next((t for t, msg in events if "stopping generation" in msg), None)
    ckpt = next(
        ((t, msg) for t, msg in events if "final checkpoint" in msg and " in " in msg), None
    )
    t_end = next((t for t, msg in events if msg.rstrip().endswith(": stopped")), None)
    out: dict[str, Any] = {"total_s": round(t_stopped - t_put, 3)}
    if t_begin is None or ckpt is None or t_end is None:
        out["log"] = "agent log lines missing"
        return out
    m = re.search(r" in ([0-9.]+) s", ckpt[1])
    ckpt_s = float(m.group(1)) if m else 0.0
    t_ckpt_start = ckpt[0] - ckpt_s
    out.update(
        {
            # PUT handled, desired state pushed over gRPC, the agent's reconcile.
            "put_to_agent_stopping_s": round(t_begin - t_put, 3),
            # SIGTERM, waiting for the tool's exit, unmounts, handle saved and reported.
            "tool_stop_s": round(t_ckpt_start - t_begin, 3),
            "final_checkpoint_s": round(ckpt_s, 3),
            # Volume release, handle saved (fsync), STOPPED sent.
            "release_s": round(t_end - ckpt[0], 3),
            # Controller commits STOPPED; the API poll sees it (≤ 20 ms of polling).
            "agent_stopped_to_api_s": round(t_stopped - t_end, 3),
        }
    )
    return out


async def agent_session(stack: LocalStack, sid: str) -> dict[str, Any]:
    assert stack.agent is not None
    listing = await asyncio.to_thread(stack.agent.cli, "sessions")
    for s in listing["sessions"]:
        if s["id"] == sid:
            return dict(s)
    raise RuntimeError(f"agent does not know session {sid}")


async def wait_first_checkpoint(stack: LocalStack, sid: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = await agent_session(stack, sid)
        if s["status"] == "running" and s["checkpointUri"]:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"first checkpoint of {sid} not written after {timeout}s")


async def timed_stop(stack: LocalStack, sid: str, poll: float) -> tuple[float, float]:
    api = stack.api
    assert api is not None
    t_put = time.time()
    await api.request("PUT", f"/studios/{sid}/stop", expect=200)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        _, studio = await api.request("GET", f"/studios/{sid}", expect=200)
        status = studio["statusInfo"]["status"]
        if status == "stopped":
            return t_put, time.time()
        if status == "errored":
            raise RuntimeError(f"stop errored: {studio['statusInfo']}")
        await asyncio.sleep(poll)
    raise TimeoutError("stop did not finish in 300 s")


def start_py_spy(agent: Any, out: Path) -> subprocess.Popen[bytes]:
    """py-spy (not a project dependency: `pip install py-spy` into the venv to profile)
    sampling every thread of the agent, idle time included, as collapsed stacks."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--pid",
            str(agent.proc.pid),
            "--rate",
            "250",
            "--idle",
            "--nonblocking",
            "--threads",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # py-spy needs a moment to attach before the first sample.
    time.sleep(0.5)
    return spy


def restic(env: dict[str, str], *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [RESTIC, *args, "--json"], env=env, capture_output=True, text=True, check=True
    )
    summary: dict[str, Any] = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            if doc.get("message_type") == "summary":
                summary = doc
    return summary


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


async def anchor(tmp: Path, venv: Path, picks: list[Path], runs: int) -> dict[str, Any]:
    """restic and the engine alone, on one copy of the tree, with the same changes."""
    tree = tmp / "anchor" / "venv"
    tree.parent.mkdir()
    subprocess.run(["cp", "-a", str(venv), str(tree)], check=True)
    env = dict(
        os.environ,
        RESTIC_PASSWORD="bench",
        RESTIC_REPOSITORY=str(tmp / "restic-repo"),
        RESTIC_CACHE_DIR=str(tmp / "restic-cache"),
    )
    subprocess.run([RESTIC, "init", "-q"], env=env, check=True, capture_output=True)
    os.sync()
    t = time.monotonic()
    restic(env, "backup", str(tree))
    restic_full = time.monotonic() - t
    repo = f"file://{tmp}/engine-repo"
    t = time.monotonic()
    parent = (await asyncio.to_thread(E.backup_sync, repo, "bench", tree)).uri
    engine_full = time.monotonic() - t
    restic_s: list[float] = []
    restic_added: list[float] = []
    engine_s: list[float] = []
    engine_added: list[float] = []
    for rep in range(runs):
        mutate(tree, rep, picks[rep])
        # Alternate who goes first, so neither always gets the warmer page cache.
        order = ("restic", "engine") if rep % 2 == 0 else ("engine", "restic")
        for who in order:
            t = time.monotonic()
            if who == "restic":
                s = restic(env, "backup", str(tree))
                restic_s.append(time.monotonic() - t)
                restic_added.append(s.get("data_added", 0) / MiB)
            else:
                r = await asyncio.to_thread(E.backup_sync, repo, "bench", tree, parent)
                engine_s.append(time.monotonic() - t)
                engine_added.append(r.added_bytes / MiB)
                parent = r.uri
    shutil.rmtree(tree.parent)
    version = subprocess.run([RESTIC, "version"], capture_output=True, text=True).stdout
    return {
        "restic": {
            "version": version.strip(),
            "repository": "local directory",
            "full_s": round(restic_full, 3),
            "incremental_s": {"median": median(restic_s), "all": [round(x, 3) for x in restic_s]},
            "incremental_added_MiB": median(restic_added),
        },
        "engine_alone": {
            "full_s": round(engine_full, 3),
            "incremental_s": {"median": median(engine_s), "all": [round(x, 3) for x in engine_s]},
            "incremental_added_MiB": median(engine_added),
        },
    }


async def measure_stops(
    tmp: Path,
    venv: Path,
    picks: list[Path],
    runs: int,
    volume_kind: str,
    profile: Path | None,
    poll: float,
) -> tuple[str, list[dict[str, Any]]]:
    """The real controller and agent: `runs` stops of a studio holding the tree."""
    stops: list[dict[str, Any]] = []
    args = [] if volume_kind == "auto" else ["--volume-kind", volume_kind]
    async with LocalStack(tmp / "stack", agent_args=args) as stack:
        api = stack.api
        assert api is not None and stack.agent is not None
        _, body = await api.request(
            "POST",
            "/studios",
            {
                "name": "bench-stop",
                "computeEnvId": stack.compute_env_id,
                "dataStudioToolUrl": TEMPLATE,
            },
            expect=200,
        )
        sid = body["studio"]["sessionId"]
        await api.wait_status(sid, "running", timeout=120)
        s = await agent_session(stack, sid)
        volume = str((s.get("volume") or {}).get("kind", "?"))
        root = Path(s["rootDir"])
        # Put the tree in, and let this first run's final checkpoint hold it.
        subprocess.run(["cp", "-a", str(venv), str(root / "venv")], check=True)
        await api.request("PUT", f"/studios/{sid}/stop", expect=200)
        await api.wait_status(sid, "stopped", timeout=300)
        for rep in range(runs):
            await api.request("PUT", f"/studios/{sid}/start", expect=200)
            await api.wait_status(sid, "running", timeout=300)
            await wait_first_checkpoint(stack, sid)
            root = Path((await agent_session(stack, sid))["rootDir"])
            changed = mutate(root / "venv", rep, picks[rep])
            spy = None
            if profile is not None:
                spy = start_py_spy(stack.agent, profile / f"stop-{rep}.txt")
            t_put, t_stopped = await timed_stop(stack, sid, poll)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=30)
            # The agent logs its last line just before it reports; let it land.
            await asyncio.sleep(0.3)
            steps = split_stop(log_events(stack.agent.log_path, sid, t_put), t_put, t_stopped)
            steps["changed_MiB"] = round(changed / MiB, 2)
            stops.append(steps)
    return volume, stops


async def run(
    runs: int,
    venv: Path,
    volume_kind: str,
    profile: Path | None = None,
    no_anchor: bool = False,
    poll: float = POLL,
) -> dict[str, Any]:
    files, size = tree_stats(venv)
    picks = victims(venv, runs + 1)
    with tempfile.TemporaryDirectory(prefix="studios-bench-stop-") as tmp_name:
        tmp = Path(tmp_name)
        anchors = {} if no_anchor else await anchor(tmp, venv, picks, runs)
        volume, stops = await measure_stops(tmp, venv, picks, runs, volume_kind, profile, poll)

    ours = [s["total_s"] for s in stops]
    step_names = [k for k in stops[0] if k.endswith("_s") and k != "total_s"]
    out: dict[str, Any] = {
        "benchmark": "PUT /studios/{id}/stop -> stopped, little changed, vs restic incremental",
        "runs": runs,
        "tree": {
            "what": "venv with numpy, pandas, scipy (pip)",
            "files": files,
            "MiB": round(size / MiB, 1),
        },
        "volume_kind": volume,
        "store": "file:// (local disk)",
        "change": "10 new files of 1 MiB + one ~1 MiB file rewritten",
        "api_poll_s": poll,
        "stop_to_stopped_s": {"median": median(ours), "all": [round(x, 3) for x in ours]},
        "stop_steps_median_s": {k: median([s[k] for s in stops if k in s]) for k in step_names},
        "stop_steps_all": stops,
        **anchors,
    }
    if anchors:
        restic_s = anchors["restic"]["incremental_s"]["median"]
        out["ratio_ours_to_restic"] = round(median(ours) / restic_s, 3)
        out["ratio_engine_to_restic"] = round(
            anchors["engine_alone"]["incremental_s"]["median"] / restic_s, 3
        )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="cache of the venv")
    parser.add_argument("--volume-kind", default="auto", choices=("auto", "xfs-loop", "directory"))
    parser.add_argument(
        "--profile", type=Path, help="write py-spy profiles of the agent's stops (collapsed)"
    )
    parser.add_argument("--no-anchor", action="store_true", help="skip restic and the engine")
    parser.add_argument(
        "--poll", type=float, default=POLL, help="seconds between GETs while stopping"
    )
    ns = parser.parse_args()
    if not os.path.exists(RESTIC):
        sys.exit(f"{RESTIC} is missing (scripts/install installs Debian's restic)")
    venv_dir = ensure_venv(ns.venv)
    print(
        json.dumps(
            asyncio.run(run(ns.runs, venv_dir, ns.volume_kind, ns.profile, ns.no_anchor, ns.poll)),
            indent=2,
        )
    )
