"""End to end through the real pair: `studio-controller serve` and `studio-agent serve` as
processes, driven over REST and the proxy, for what the other tests join only through a
fake of the other side of the gRPC stream:

- which checkpoint a start restores when a studio has several (the newest), and which one
  "add as new" restores (the chosen one);
- a podman session (the busybox test image of scripts/podman-setup as a custom template);
- an S3 checkpoint store (SeaweedFS);
- a data-link made through the REST API, mounted in the session and kept out of its
  checkpoint;
- garbage collection after a studio is deleted.

Each test keeps to one studio (two where a clone is the point) and files of a few KiB.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.checkpoints.repo import split_checkpoint_uri
from tests import s3_server as _s3
from tests.e2e_harness import RestClient, Stack, agent_session, open_studio, script
from tests.integration import require
from tests.s3_server import S3Server

pytestmark = pytest.mark.e2e
# The shared SeaweedFS of the test session (a fixture by name).
s3_server = _s3.s3_server

TEMPLATE = "studios/python-http:3.11-0.1"
IMAGE = os.environ.get("STUDIOS_TEST_IMAGE", "localhost/studios/busybox-httpd:1.36-0.1")
PODMAN_SOCKET = Path(os.environ.get("STUDIOS_PODMAN_SOCKET", "/run/podman/podman.sock"))
# Plain directories keep these tests lean; the volume kinds have their own tests.
DIRECTORY_VOLUMES = ("--volume-kind", "directory")


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        await s.close()


def _api(stack: Stack) -> RestClient:
    assert stack.api is not None
    return stack.api


def _root(stack: Stack, sid: str) -> Path:
    session = agent_session(stack.agent, sid)
    assert session["status"] == "running", session
    return Path(session["rootDir"])


def _s3fs(srv: S3Server) -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        key=srv.key,
        secret=srv.secret,
        client_kwargs={"endpoint_url": srv.endpoint},
        skip_instance_cache=True,
    )


# ---------------------------------------------------------------- restore-point choice


async def test_start_restores_the_newest_checkpoint_and_a_clone_the_chosen_one(
    stack: Stack,
) -> None:
    await stack.start(agent_args=DIRECTORY_VOLUMES)
    api = _api(stack)
    sid = await stack.create_studio("points", dataStudioToolUrl=TEMPLATE)

    # Three runs, each leaving a different version of one file in its checkpoint.
    for run in (1, 2, 3):
        studio = await stack.wait_running(sid)
        if run > 1:
            # With two checkpoints behind it, the third run must see the second one's file.
            assert await open_studio(api, studio, "/version.txt") == f"run {run - 1}\n"
        (_root(stack, sid) / "version.txt").write_text(f"run {run}\n")
        await stack.stop_studio(sid)
        if run < 3:
            await api.request("PUT", f"/studios/{sid}/start", {}, expect=200)

    checkpoints = await stack.checkpoints(sid)
    assert len(checkpoints) == 3, checkpoints
    assert {c["status"] for c in checkpoints} == {"finalized"}

    # The next start restores the newest of the three (the oldest holds "run 1").
    studio = await stack.start_studio(sid)
    assert await open_studio(api, studio, "/version.txt") == "run 3\n"
    await stack.stop_studio(sid)

    # Add as new from the middle checkpoint: neither the newest nor the oldest.
    chosen = checkpoints[1]
    clone = await stack.create_studio("points clone", initialCheckpointId=chosen["id"])
    studio = await stack.wait_running(clone)
    assert studio["parentCheckpoint"]["checkpointId"] == chosen["id"], studio
    assert await open_studio(api, studio, "/version.txt") == "run 2\n"
    await stack.stop_studio(clone)
    # The parent is untouched by its clone.
    studio = await stack.start_studio(sid)
    assert await open_studio(api, studio, "/version.txt") == "run 3\n"
    await stack.stop_studio(sid)


# ---------------------------------------------------------------- podman


def _podman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=False)


def _require_podman() -> None:
    require(os.geteuid() == 0, "the podman runtime's xfs-loop volumes need root")
    require(shutil.which("podman") is not None, "podman is not installed (scripts/install)")
    from agent.host import doctor_report

    report = doctor_report("podman", "xfs-loop", PODMAN_SOCKET)
    by_name = {r["name"]: r for r in report["runtimes"]}
    podman = by_name.get("podman", {"usable": False, "reason": "not in `studio-agent doctor`"})
    require(bool(podman["usable"]), f"podman runtime: {podman['reason']} (scripts/podman-setup)")
    volumes = {v["name"]: v for v in report["volumeKinds"]}
    xfs = volumes.get("xfs-loop", {"usable": False, "reason": "not in `studio-agent doctor`"})
    require(bool(xfs["usable"]), f"xfs-loop volumes: {xfs['reason']}")
    require(
        _podman("image", "exists", IMAGE).returncode == 0,
        f"test image {IMAGE} is missing (scripts/podman-setup builds it)",
    )


def _container_of(sid: str) -> str:
    from agent.runtime.podman import LABEL_SESSION

    out = _podman("ps", "-q", "--filter", f"label={LABEL_SESSION}={sid}")
    ids = out.stdout.split()
    assert len(ids) == 1, f"expected one running container of {sid}: {out.stdout} {out.stderr}"
    return ids[0]


@pytest.mark.podman
@pytest.mark.root
async def test_podman_session_through_the_pair(stack: Stack) -> None:
    _require_podman()
    await stack.start(
        runtime="podman",
        agent_args=(
            "--volume-kind",
            "xfs-loop",
            "--podman-socket",
            str(PODMAN_SOCKET),
            "--podman-runtime",
            "runc",
            "--container-ulimit",
            "nofile=1024:1024",
            "--container-ulimit",
            "nproc=1024:1024",
        ),
    )
    api = _api(stack)
    sid = await stack.create_studio("podman", dataStudioToolUrl=IMAGE)
    studio = await stack.wait_running(sid, timeout=120)
    assert studio["template"]["repository"] == IMAGE, studio["template"]
    session = agent_session(stack.agent, sid)
    assert session["runtime"] == "podman", session
    assert await open_studio(api, studio, "/") == "studios busybox httpd\n"

    # A file written inside the container, on the overlay's upper directory.
    cid = _container_of(sid)
    out = _podman("exec", cid, "sh", "-c", "echo kept across runs > /www/kept.txt")
    assert out.returncode == 0, out.stderr
    assert await open_studio(api, studio, "/kept.txt") == "kept across runs\n"

    await stack.stop_studio(sid, timeout=90)
    assert _podman("ps", "-q", "--filter", f"id={cid}").stdout.strip() == ""
    [checkpoint] = await stack.checkpoints(sid)
    assert checkpoint["status"] == "finalized"

    studio = await stack.start_studio(sid, timeout=120)
    assert _container_of(sid) != cid, "a new run runs a new container"
    assert await open_studio(api, studio, "/kept.txt") == "kept across runs\n"
    assert await open_studio(api, studio, "/") == "studios busybox httpd\n"
    await stack.stop_studio(sid, timeout=90)


# ---------------------------------------------------------------- S3 checkpoint store


async def test_s3_checkpoint_store_through_the_pair(tmp_path: Path, s3_server: S3Server) -> None:
    bucket = s3_server.make_bucket(f"e2e-{os.urandom(4).hex()}")
    keys = {"AWS_ACCESS_KEY_ID": s3_server.key, "AWS_SECRET_ACCESS_KEY": s3_server.secret}
    # As the README says: keys from the environment; the endpoint from --s3-endpoint for
    # the agent and STUDIOS_S3_ENDPOINT for the controller (which has no such flag).
    stack = Stack(
        tmp_path,
        work_dir=f"s3://{bucket}/team-work",
        controller_env={**keys, "STUDIOS_S3_ENDPOINT": s3_server.endpoint},
    )
    try:
        await stack.start(
            agent_args=(*DIRECTORY_VOLUMES, "--s3-endpoint", s3_server.endpoint), agent_env=keys
        )
        api = _api(stack)
        sid = await stack.create_studio("s3 store", dataStudioToolUrl=TEMPLATE)
        await stack.wait_running(sid)
        payload = os.urandom(48 * 1024)
        (_root(stack, sid) / "payload.bin").write_bytes(payload)
        await stack.stop_studio(sid)

        [checkpoint] = await stack.checkpoints(sid)
        assert checkpoint["status"] == "finalized"
        base, session_id, key = split_checkpoint_uri(checkpoint["path"])
        assert base == f"s3://{bucket}/team-work/.studios/checkpoints", checkpoint["path"]
        assert session_id == sid
        fs = _s3fs(s3_server)
        prefix = f"{bucket}/team-work/.studios/checkpoints"
        assert fs.exists(f"{prefix}/manifests/{sid}/{key}"), fs.find(prefix)
        assert fs.find(f"{prefix}/data"), "no packs in the bucket"
        # Nothing of the store was written on the agent's host instead.
        assert not (tmp_path / "work").exists()

        studio = await stack.start_studio(sid)
        assert (_root(stack, sid) / "payload.bin").read_bytes() == payload
        assert "payload.bin" in await open_studio(api, studio, "/")
        await stack.stop_studio(sid)
    finally:
        await stack.close()


# ---------------------------------------------------------------- data-links


def _require_data_links() -> None:
    from agent.datalinks.mounter import fuse_usable

    ok, why = fuse_usable()
    require(ok, f"FUSE mounts: {why}")
    require(shutil.which("s3fs") is not None, "s3fs-fuse is not installed (scripts/install)")


@pytest.mark.root
async def test_data_link_made_through_the_api_is_mounted_and_not_checkpointed(
    stack: Stack, s3_server: S3Server, tmp_path: Path
) -> None:
    _require_data_links()
    bucket = s3_server.make_bucket(f"dl-{os.urandom(4).hex()}")
    _s3fs(s3_server).pipe_file(f"{bucket}/inputs/hello.txt", b"from the bucket\n")
    await stack.start(agent_args=DIRECTORY_VOLUMES)
    api = _api(stack)

    _, body = await api.request(
        "POST",
        "/credentials",
        {
            "credentials": {
                "name": "seaweed",
                "provider": "aws",
                "keys": {"accessKey": s3_server.key, "secretKey": s3_server.secret},
                "baseUrl": s3_server.endpoint,
                "region": "us-east-1",
            }
        },
        expect=200,
    )
    _, link = await api.request(
        "POST",
        "/data-links",
        {
            "name": "Inputs",
            "resourceRef": f"s3://{bucket}/inputs",
            "provider": "aws",
            "credentialsId": body["credentialsId"],
        },
        expect=200,
    )
    sid = await stack.create_studio(
        "with data",
        dataStudioToolUrl=TEMPLATE,
        configuration={"mountDataV2": [{"dataLinkId": link["id"]}]},
    )
    studio = await stack.wait_running(sid)
    [mounted] = studio["mountedDataLinks"]
    name = mounted["mountName"]
    assert name == "inputs", mounted

    root = _root(stack, sid)
    assert (root / "workspace" / "data" / name / "hello.txt").read_bytes() == b"from the bucket\n"
    # The tool sees it too: the python-http tool serves the session's root.
    assert (
        await open_studio(api, studio, f"/workspace/data/{name}/hello.txt") == "from the bucket\n"
    )
    (root / "own.txt").write_text("the session's own file\n")
    await stack.stop_studio(sid)

    # The checkpoint has the session's own file and nothing of the bucket.
    [checkpoint] = await stack.checkpoints(sid)
    target = tmp_path / "restored"
    out = subprocess.run(
        [
            script("studio-agent"),
            *("checkpoint", "restore", checkpoint["path"]),
            *("--target", str(target), "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert "own.txt" in files, files
    assert not [f for f in files if f.startswith("workspace/data/")], files
    # The bucket's object is untouched by the stop.
    assert _s3fs(s3_server).cat_file(f"{bucket}/inputs/hello.txt") == b"from the bucket\n"


# ---------------------------------------------------------------- GC after delete


def _files(directory: Path) -> set[str]:
    if not directory.is_dir():
        return set()
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


async def _wait_gc_after(api: RestClient, since: datetime, timeout: float = 60.0) -> dict[str, Any]:
    """The compute environment's first GC run that started after `since`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        _, body = await api.request("GET", "/compute-envs", expect=200)
        [env] = body["computeEnvs"]
        last = env.get("checkpointGc")
        if last and last.get("finishedAt"):
            started = datetime.fromisoformat(last["startedAt"].replace("Z", "+00:00"))
            if started >= since:
                return dict(last)
        await asyncio.sleep(0.5)
    raise TimeoutError(f"no checkpoint GC run after {since.isoformat()} in {timeout}s: {last}")


async def test_gc_after_delete_keeps_what_a_live_clone_needs(stack: Stack) -> None:
    await stack.start(agent_args=DIRECTORY_VOLUMES)
    api = _api(stack)
    store = Path(stack.work_dir) / ".studios" / "checkpoints"
    sid = await stack.create_studio("doomed", dataStudioToolUrl=TEMPLATE)

    await stack.wait_running(sid)
    kept = os.urandom(64 * 1024)
    (_root(stack, sid) / "kept.bin").write_bytes(kept)
    await stack.stop_studio(sid)
    packs_first = _files(store / "data")
    assert packs_first, "the first checkpoint wrote no packs"

    await stack.start_studio(sid)
    (_root(stack, sid) / "only-in-run-2.bin").write_bytes(os.urandom(64 * 1024))
    await stack.stop_studio(sid)
    packs_only_second = _files(store / "data") - packs_first
    assert packs_only_second, "the second checkpoint wrote no new packs"
    first, second = await stack.checkpoints(sid)

    # A clone of the first checkpoint, never started: its first start needs that checkpoint.
    clone = await stack.create_studio("survivor", initialCheckpointId=first["id"], auto_start=False)
    # The controller's GC keeps unreferenced packs younger than an hour (not settable on
    # `studio-controller serve`): the test ages the store's packs instead of waiting.
    old = time.time() - 2 * 3600
    for name in _files(store / "data"):
        os.utime(store / "data" / name, (old, old))
    manifests_before = _files(store / "manifests" / sid)
    first_manifest = "/".join(split_checkpoint_uri(first["path"])[1:])
    second_manifest = "/".join(split_checkpoint_uri(second["path"])[1:])
    assert {first_manifest, second_manifest} <= {f"{sid}/{m}" for m in manifests_before}

    deleted_at = datetime.now(UTC).replace(microsecond=0)
    await api.request("DELETE", f"/studios/{sid}", expect=204)
    run = await _wait_gc_after(api, deleted_at)
    assert run["ok"], run
    assert run["deletedManifests"] >= 1 and run["deletedPacks"] >= len(packs_only_second), run

    remaining = {f"{sid}/{m}" for m in _files(store / "manifests" / sid)}
    assert remaining == {first_manifest}, f"left after GC: {remaining}"
    packs_after = _files(store / "data")
    assert packs_first <= packs_after, (
        f"GC deleted packs the clone needs: {packs_first - packs_after}"
    )
    assert not packs_only_second & packs_after, "packs of the deleted run were kept"

    # The clone still restores the parent's first checkpoint from what GC left.
    studio = await stack.start_studio(clone)
    root = _root(stack, clone)
    assert (root / "kept.bin").read_bytes() == kept
    assert not (root / "only-in-run-2.bin").exists()
    assert "kept.bin" in await open_studio(api, studio, "/")
    await stack.stop_studio(clone)
    print(json.dumps({"gc_run": run}))
