"""Data-links FUSE-mounted into sessions, against a real SeaweedFS and real FUSE (root).

Through `DataLinkMounter` for the mount's own behaviour (read-only, sub-directory
confinement, bad credentials, the store going away) and through a real agent with the
local runtime (and one podman test) for the session's: the data reaches the bucket, it
is not in the checkpoint, the mounts go at stop and after an agent crash.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.checkpoints import engine as E
from agent.daemon import Agent
from agent.datalinks.mounter import DataLinkMounter, backend_named, fuse_usable, state_of
from agent.host_mounts import (
    detach_mounts_under_sync,
    is_mount_point,
    mount_points_under,
    parse_resource_ref,
)
from agent.runtime import ExitStatus, Runtime, RuntimeHandle, RuntimeOptions, StartSpec
from agent.sessions import SessionManager
from agent.sessions.handle import SessionHandle, save_handle
from agent.state import StateDir
from agent.volumes.directory import DirectoryVolume
from tests import s3_server as _s3
from tests.agent.volumes.test_xfs import _released
from tests.agent_fixtures import (  # noqa: F401  (fixtures by name)
    controller_fixture,
    kill_leftover_tools,
    make_agent_config,
)
from tests.fake_controller import FakeController, desired
from tests.integration import require
from tests.s3_server import S3Server, require_weed

pytestmark = [pytest.mark.root]
# The shared SeaweedFS of the test session (a fixture by name).
s3_server = _s3.s3_server

RUNNING = pb.SESSION_STATUS_RUNNING
STOPPED = pb.SESSION_STATUS_STOPPED
ERRORED = pb.SESSION_STATUS_ERRORED
FINALIZED = pb.CHECKPOINT_STATUS_FINALIZED


def _require_fuse() -> None:
    ok, why = fuse_usable()
    require(ok, f"FUSE mounts: {why}")
    require(shutil.which("s3fs") is not None, "s3fs-fuse is not installed (scripts/install)")


@pytest.fixture(autouse=True)
def _no_mounts_left(tmp_path: Path) -> Iterator[None]:
    _require_fuse()
    yield
    # Whatever a failing test left: never a FUSE mount behind.
    detach_mounts_under_sync(tmp_path)


def _fs(srv: S3Server) -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        key=srv.key,
        secret=srv.secret,
        client_kwargs={"endpoint_url": srv.endpoint},
        skip_instance_cache=True,
    )


def _bucket(srv: S3Server) -> str:
    return srv.make_bucket(f"dl-{uuid.uuid4().hex[:12]}")


def _link(
    srv: S3Server,
    ref: str,
    name: str,
    *,
    read_only: bool = False,
    required: bool = True,
    secret: str | None = None,
    endpoint: str | None = None,
) -> pb.DataLinkMount:
    return pb.DataLinkMount(
        data_link_id=f"id-{name}",
        mount_name=name,
        resource_ref=ref,
        read_only=read_only,
        endpoint=srv.endpoint if endpoint is None else endpoint,
        access_key_id=srv.key,
        secret_access_key=srv.secret if secret is None else secret,
        required=required,
    )


def _mounter(name: str = "s3fs") -> DataLinkMounter:
    backend = backend_named(name)
    assert backend is not None
    ok, why = backend.available()
    require(ok, f"data-link mounter {name}: {why}")
    return DataLinkMounter(backend, ready_timeout=20, preflight_timeout=3)


# The default mounter and its alternative obey the same rules.
MOUNTERS = pytest.mark.parametrize("mounter", ["s3fs", "rclone"])


def _errno_of(fn: Any) -> int:
    try:
        fn()
    except OSError as exc:
        return exc.errno or 0
    return 0


# ---------------------------------------------------------------- the mount itself


@MOUNTERS
async def test_read_only_refuses_writes_with_erofs(
    s3_server: S3Server, tmp_path: Path, mounter: str
) -> None:
    bucket = _bucket(s3_server)
    fs = _fs(s3_server)
    fs.pipe_file(f"{bucket}/data/in.txt", b"input\n")
    m = _mounter(mounter)
    [st] = await m.mount_all(tmp_path, [_link(s3_server, f"s3://{bucket}", "ref", read_only=True)])
    assert st.state == "read-only", st.message
    mnt = Path(st.host_path)
    assert (mnt / "data" / "in.txt").read_bytes() == b"input\n"
    assert _errno_of(lambda: (mnt / "new.txt").write_bytes(b"x")) == errno.EROFS
    assert _errno_of(lambda: (mnt / "data" / "in.txt").write_bytes(b"x")) == errno.EROFS
    assert _errno_of(lambda: (mnt / "dir").mkdir()) == errno.EROFS
    assert _errno_of(lambda: (mnt / "data" / "in.txt").unlink()) == errno.EROFS
    # The FUSE `ro` option itself, not only the helper refusing.
    line = next(x for x in Path("/proc/self/mountinfo").read_text().splitlines() if str(mnt) in x)
    assert "ro" in line.split()[5].split(",")
    fs.invalidate_cache()
    assert sorted(fs.find(bucket)) == [f"{bucket}/data/in.txt"]
    await m.unmount_all(tmp_path, [st])
    assert not is_mount_point(mnt)


@MOUNTERS
async def test_sub_directory_data_link_cannot_see_its_parent(
    s3_server: S3Server, tmp_path: Path, mounter: str
) -> None:
    bucket = _bucket(s3_server)
    fs = _fs(s3_server)
    fs.pipe_file(f"{bucket}/top-secret.txt", b"secret\n")
    fs.pipe_file(f"{bucket}/sub/sibling.txt", b"sibling\n")
    fs.pipe_file(f"{bucket}/sub/dir/inside.txt", b"inside\n")
    m = _mounter(mounter)
    [st] = await m.mount_all(tmp_path, [_link(s3_server, f"s3://{bucket}/sub/dir", "sub")])
    assert st.state == "mounted", st.message
    mnt = Path(st.host_path)
    assert sorted(os.listdir(mnt)) == ["inside.txt"]
    # `..` is resolved by the kernel on the host: it is the mounts dir, not the bucket.
    assert sorted(os.listdir(mnt / "..")) == ["sub"]
    assert not (mnt / ".." / "sibling.txt").exists()
    assert not (mnt / ".." / ".." / "top-secret.txt").exists()
    # Symlinks, relative or absolute, resolve on the host too, never in the bucket
    # (rclone refuses to create them at all).
    for link, target in (("rel-escape", "../../top-secret.txt"), ("abs-escape", "/top-secret.txt")):
        made = _errno_of(lambda link=link, target=target: os.symlink(target, mnt / link))
        if made == 0:
            assert _errno_of(lambda link=link: (mnt / link).read_bytes()) == errno.ENOENT
        else:
            assert mounter == "rclone", made
    # Writes land below the prefix only.
    (mnt / "new.txt").write_bytes(b"new\n")
    # rclone uploads after close (--vfs-write-back): wait for it.
    deadline = time.monotonic() + 30
    while not fs.exists(f"{bucket}/sub/dir/new.txt") and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        fs.invalidate_cache()
    assert fs.cat_file(f"{bucket}/sub/dir/new.txt") == b"new\n"
    assert not fs.exists(f"{bucket}/new.txt")
    await m.unmount_all(tmp_path, [st])
    # A resource with `..` never gets as far as the mount tool.
    with pytest.raises(ValueError):
        parse_resource_ref(f"s3://{bucket}/sub/../other")
    [bad] = await m.mount_all(
        tmp_path, [_link(s3_server, f"s3://{bucket}/sub/..", "dots", required=False)]
    )
    assert bad.state == "failed" and "bad resource" in bad.message


async def test_wrong_credentials_and_unreachable_endpoint_name_the_link(
    s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = _bucket(s3_server)
    m = _mounter()
    wrong = _link(s3_server, f"s3://{bucket}", "wrong", secret="not-the-secret", required=False)
    dead = _link(s3_server, f"s3://{bucket}", "dead", endpoint="http://127.0.0.1:9", required=False)
    t0 = time.monotonic()
    statuses = await m.mount_all(tmp_path, [wrong, dead])
    assert time.monotonic() - t0 < 60
    assert [s.state for s in statuses] == ["failed", "failed"]
    assert "id-wrong" in statuses[0].message and s3_server.endpoint in statuses[0].message
    assert "denied" in statuses[0].message.lower() or "signature" in statuses[0].message.lower()
    assert "id-dead" in statuses[1].message and "http://127.0.0.1:9" in statuses[1].message
    assert not mount_points_under(tmp_path)
    # Two data-links under one name: the second never covers the first.
    one, two = (
        _link(s3_server, f"s3://{bucket}", "same"),
        _link(s3_server, f"s3://{bucket}", "same"),
    )
    two.data_link_id, two.required = "id-other", False
    first, second = await m.mount_all(tmp_path, [one, two])
    assert first.state == "mounted" and second.state == "failed"
    assert "already used" in second.message and is_mount_point(first.host_path)
    await m.unmount_all(tmp_path, [first, second])
    # Required: the start fails with that message, nothing stays mounted.
    ok = _link(s3_server, f"s3://{bucket}", "fine")
    wrong.required = True
    with pytest.raises(Exception, match="id-wrong"):
        await m.mount_all(tmp_path, [ok, wrong])
    assert not mount_points_under(tmp_path)


async def test_store_gone_while_mounted_reads_fail_and_unmount_works(tmp_path: Path) -> None:
    srv = S3Server(tmp_path / "weed", require_weed())
    srv.start()
    try:
        bucket = _bucket(srv)
        _fs(srv).pipe_file(f"{bucket}/later.txt", b"later\n")
        m = _mounter()
        [st] = await m.mount_all(tmp_path / "sess", [_link(srv, f"s3://{bucket}", "gone")])
        assert st.state == "mounted", st.message
        mnt = Path(st.host_path)
        srv.stop()
        # A child process: a read stuck in the kernel could be abandoned.
        proc = await asyncio.create_subprocess_exec(
            "cat",
            str(mnt / "later.txt"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), timeout=90)
        assert proc.returncode != 0, "a read through a mount whose store is gone succeeded"
        assert b"Input/output error" in err or b"No such file" in err
        t0 = time.monotonic()
        await m.unmount_all(tmp_path / "sess", [st])
        assert time.monotonic() - t0 < 30
        assert not is_mount_point(mnt)
        assert not (tmp_path / "sess" / "datalinks").exists()
    finally:
        srv.stop()


async def test_leftover_mounts_are_cleaned_at_agent_start(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """After an agent crash: mounts of sessions it no longer runs are unmounted by
    `recover`, those of running sessions are left alone."""
    bucket = _bucket(s3_server)
    state = StateDir(tmp_path / "state")
    state.ensure()
    m = _mounter()
    gone = await m.mount_all(
        state.session_dir("dead0001"), [_link(s3_server, f"s3://{bucket}", "a")]
    )
    kept = await m.mount_all(
        state.session_dir("live0001"), [_link(s3_server, f"s3://{bucket}", "b")]
    )
    # A stopped session's handle (the agent died between the tool's end and the unmount),
    # and a running one whose tool still runs.
    for sid, status in (("dead0001", "stopped"), ("live0001", "running")):
        save_handle(
            state,
            SessionHandle(session_id=sid, generation=1, status=status, runtime="local", pid=0),
        )
    manager = SessionManager(
        state=state, runtime=_NeverRunning(), volumes=DirectoryVolume(), datalinks=m
    )
    await manager.recover()
    await manager.wait_idle()
    assert not is_mount_point(gone[0].host_path)
    # live0001's tool is gone too (pid 0): it is ended through the normal path, which
    # unmounts; with a live tool its mount would have stayed.
    assert not is_mount_point(kept[0].host_path)
    await manager.close()
    assert not mount_points_under(state.root)


class _NeverRunning(Runtime):
    """A runtime whose tools are all gone (the agent-crash tests need no real tool):
    recovery finds none, and nothing is started, waited for or stopped on it."""

    name = "local"

    @classmethod
    def available(cls, options: RuntimeOptions) -> tuple[bool, str]:
        return True, ""

    async def start(self, spec: StartSpec) -> RuntimeHandle:
        raise AssertionError("no tool starts on this runtime")

    async def poll(self, handle: RuntimeHandle) -> ExitStatus | None:
        raise AssertionError("no tool runs on this runtime")

    async def wait(self, handle: RuntimeHandle) -> ExitStatus:
        raise AssertionError("no tool runs on this runtime")

    async def stop(self, handle: RuntimeHandle, grace_seconds: float) -> ExitStatus | None:
        raise AssertionError("no tool runs on this runtime")

    async def destroy(self, handle: RuntimeHandle) -> None:
        raise AssertionError("no tool runs on this runtime")

    async def recover(self, handle: RuntimeHandle) -> bool:
        return False

    async def logs(self, handle: RuntimeHandle, max_lines: int = 50) -> str:
        return ""

    def checkpoint_dir(self, volume_root: Path) -> Path:
        return volume_root


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_walk_skips_workspace_data_and_mount_points(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "workspace" / "data" / "link").mkdir(parents=True)
    (root / "workspace" / "data" / "link" / "bucket-file.txt").write_bytes(b"x")
    (root / "workspace" / "mine.txt").write_bytes(b"mine")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "efs-file.txt").write_bytes(b"efs")
    (root / "mnt" / "efs").mkdir(parents=True)
    # A bind of a directory of the same file system: same st_dev, still a mount point.
    subprocess.run(["mount", "--bind", str(shared), str(root / "mnt" / "efs")], check=True)
    try:
        assert os.stat(root / "mnt" / "efs").st_dev == os.stat(root).st_dev
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            paths = [p for p, _ in E._walk(str(root), root_fd)]
        finally:
            os.close(root_fd)
    finally:
        subprocess.run(["umount", str(root / "mnt" / "efs")], check=True)
    assert "workspace/mine.txt" in paths
    assert "workspace/data" in paths and "mnt/efs" in paths
    assert not [p for p in paths if p.startswith(("workspace/data/", "mnt/efs/"))]


def test_local_binds_without_root_are_symlinks_and_never_go_through_one(tmp_path: Path) -> None:
    from agent.runtime import BindMount
    from agent.runtime.binds import expose_binds

    root, source = tmp_path / "root", tmp_path / "bucket-mount"
    root.mkdir()
    source.mkdir()
    expose_binds(root, [BindMount(source, "/workspace/data/x")], as_root=False)
    link = root / "workspace" / "data" / "x"
    assert link.is_symlink() and os.readlink(link) == str(source)
    # Idempotent (a second start, or a link restored from a checkpoint).
    expose_binds(root, [BindMount(source, "/workspace/data/x")], as_root=False)
    # A session-made `opt -> /etc` link is never followed to place a mount.
    os.symlink("/etc", root / "opt")
    with pytest.raises(ValueError, match="symlink"):
        expose_binds(root, [BindMount(source, "/opt/efs")], as_root=False)
    with pytest.raises(ValueError):
        expose_binds(root, [BindMount(source, "/../escape")], as_root=False)
    assert not (Path("/etc") / "efs").exists()


# ---------------------------------------------------------------- through the agent


@pytest.fixture
async def dl_agent(tmp_path: Path, controller: FakeController) -> AsyncIterator[Agent]:
    config = make_agent_config(
        tmp_path,
        controller,
        checkpoint_interval_seconds=3600.0,
        # The tests' file-system mounts lie under tmp_path (the operator's allowed prefix).
        allowed_host_paths=(str(tmp_path / "efs"),),
    )
    a = Agent(config)
    await a.start()
    await controller.wait_for(lambda: controller.messages("inventory"))
    try:
        yield a
    finally:
        await a.close()
        kill_leftover_tools(config.state_dir)
        detach_mounts_under_sync(tmp_path)


def _with_links(d: pb.SessionDesired, *links: pb.DataLinkMount) -> pb.SessionDesired:
    d.spec.data_links.extend(links)
    return d


def _manifest_paths(uri: str) -> list[str]:
    return [e.path for e in E._load_manifest_uri(uri, None).entries]


async def test_session_data_reaches_the_bucket_and_never_the_checkpoint(
    s3_server: S3Server, controller: FakeController, dl_agent: Agent, tmp_path: Path
) -> None:
    bucket = _bucket(s3_server)
    fs = _fs(s3_server)
    fs.pipe_file(f"{bucket}/ref/input.csv", b"a,b\n1,2\n")
    base = f"file://{tmp_path}/work/.studios/checkpoints"
    sid = "d1a10001"
    shared = tmp_path / "efs"
    shared.mkdir()
    (shared / "shared.txt").write_bytes(b"shared\n")
    d = _with_links(
        desired(sid, checkpoint_base_uri=base),
        _link(s3_server, f"s3://{bucket}/out", "results"),
        _link(s3_server, f"s3://{bucket}/ref", "reference", read_only=True),
        _link(s3_server, f"s3://{bucket}", "broken", secret="nope", required=False),
    )
    d.spec.file_system_mounts.add(host_path=str(shared), mount_path="/mnt/efs", read_only=True)
    controller.push(d)
    obs = await controller.wait_status(sid, RUNNING)
    assert [(s.mount_name, state_of(s)) for s in obs.data_links] == [
        ("results", "mounted"),
        ("reference", "read-only"),
        ("broken", "failed"),
    ]
    assert "id-broken" in obs.data_links[2].message and "id-broken" in obs.message
    # Credentials are never persisted in the handle.
    handle = (dl_agent.state.session_dir(sid) / "handle.json").read_text()
    assert s3_server.secret not in handle
    root = Path(obs.root_dir)
    data = root / "workspace" / "data"
    (data / "results" / "model.txt").write_bytes(b"trained\n")
    (root / "own.txt").write_bytes(b"session file\n")
    assert (data / "reference" / "input.csv").read_bytes() == b"a,b\n1,2\n"
    assert _errno_of(lambda: (data / "reference" / "x").write_bytes(b"x")) == errno.EROFS
    assert (root / "mnt" / "efs" / "shared.txt").read_bytes() == b"shared\n"
    assert _errno_of(lambda: (root / "mnt" / "efs" / "x").write_bytes(b"x")) == errno.EROFS
    fs.invalidate_cache()
    assert fs.cat_file(f"{bucket}/out/model.txt") == b"trained\n"

    controller.push(desired(sid, status=pb.DESIRED_STATUS_STOPPED, checkpoint_base_uri=base))
    stopped = await controller.wait_status(sid, STOPPED)
    assert [state_of(s) for s in stopped.data_links] == ["unmounted", "unmounted", "failed"]
    assert not mount_points_under(dl_agent.state.root)
    assert not (shared / "x").exists() and (shared / "shared.txt").exists()
    final = [e for e in controller.messages("checkpoint") if e.status == FINALIZED][-1]
    paths = _manifest_paths(final.uri)
    assert "own.txt" in paths
    assert not [p for p in paths if p.startswith(("workspace/data/", "mnt/efs/"))], paths
    fs.invalidate_cache()
    assert fs.cat_file(f"{bucket}/out/model.txt") == b"trained\n"

    # Start again: the data is there through the mount, the session file from the checkpoint.
    d2 = _with_links(
        desired(sid, generation=2, checkpoint_base_uri=base, restore_uri=final.uri),
        _link(s3_server, f"s3://{bucket}/out", "results"),
    )
    controller.push(d2)
    obs2 = await controller.wait_status(sid, RUNNING, generation=2)
    root2 = Path(obs2.root_dir)
    assert (root2 / "workspace" / "data" / "results" / "model.txt").read_bytes() == b"trained\n"
    assert (root2 / "own.txt").read_bytes() == b"session file\n"
    controller.push(
        desired(sid, status=pb.DESIRED_STATUS_DELETED, generation=2, checkpoint_base_uri=base)
    )
    await controller.wait_for(lambda: dl_agent.manager and not dl_agent.manager.get(sid))
    assert not mount_points_under(dl_agent.state.root)
    fs.invalidate_cache()
    # Deleting the session never deletes the bucket's data.
    assert fs.cat_file(f"{bucket}/out/model.txt") == b"trained\n"


async def test_required_data_link_that_fails_errors_the_start(
    s3_server: S3Server, controller: FakeController, dl_agent: Agent
) -> None:
    bucket = _bucket(s3_server)
    sid = "d1a10002"
    controller.push(
        _with_links(
            desired(sid),
            _link(s3_server, f"s3://{bucket}", "ok"),
            _link(s3_server, f"s3://{bucket}", "needed", endpoint="http://127.0.0.1:9"),
            _link(s3_server, f"s3://{bucket}", "later"),
        )
    )
    obs = await controller.wait_status(sid, ERRORED)
    assert "id-needed" in obs.message and "http://127.0.0.1:9" in obs.message
    assert [(s.mount_name, state_of(s)) for s in obs.data_links] == [
        ("ok", "unmounted"),
        ("needed", "failed"),
        ("later", "unmounted"),
    ]
    assert not mount_points_under(dl_agent.state.root)


async def test_mounts_cleaned_after_agent_crash_when_the_tool_died(
    s3_server: S3Server, controller: FakeController, tmp_path: Path
) -> None:
    """The agent goes away with a session running (its mounts stay, as the tool does);
    the tool dies meanwhile; the next agent unmounts everything of that session."""
    bucket = _bucket(s3_server)
    config = make_agent_config(tmp_path, controller, checkpoint_interval_seconds=3600.0)
    sid = "d1a10003"
    a = Agent(config)
    await a.start()
    try:
        controller.push(_with_links(desired(sid), _link(s3_server, f"s3://{bucket}", "x")))
        await controller.wait_status(sid, RUNNING)
        assert mount_points_under(a.state.root)
    finally:
        await a.close()
    assert mount_points_under(config.state_dir), "mounts should outlive the agent process"
    # A restart with the tool alive re-adopts the session and leaves its mounts alone.
    again = Agent(config)
    await again.start()
    try:
        await controller.wait_for(lambda: len(controller.messages("inventory")) >= 2)
        inv = controller.messages("inventory")[-1]
        [sess] = [x for x in inv.sessions if x.session_id == sid]
        assert sess.status == RUNNING
        assert [state_of(x) for x in sess.data_links] == ["mounted"]
        assert mount_points_under(config.state_dir)
    finally:
        await again.close()
    kill_leftover_tools(config.state_dir)
    b = Agent(config)
    await b.start()
    try:
        await controller.wait_status(sid, ERRORED)
        await asyncio.sleep(0.5)
        assert b.manager is not None
        await b.manager.wait_idle()
        assert not mount_points_under(config.state_dir)
    finally:
        await b.close()
        kill_leftover_tools(config.state_dir)


@pytest.mark.podman
async def test_podman_session_sees_data_links_and_the_upper_dir_does_not(
    s3_server: S3Server, controller: FakeController, tmp_path: Path
) -> None:
    from tests.agent.runtime.test_podman import (
        IMAGE,
        _agent,
        _cleanup,
        _config,
        _podman,
        _require_podman,
    )

    _require_podman()
    bucket = _bucket(s3_server)
    fs = _fs(s3_server)
    fs.pipe_file(f"{bucket}/ref/input.txt", b"input\n")
    base = f"file://{tmp_path}/work/.studios/checkpoints"
    shared = tmp_path / "efs"
    shared.mkdir()
    (shared / "shared.txt").write_bytes(b"shared\n")
    config = _config(tmp_path, controller)
    config.allowed_host_paths = (str(shared),)
    sid = "d1a1c001"
    try:
        async with _agent(config) as agent:
            d = _with_links(
                desired(sid, image=IMAGE, checkpoint_base_uri=base),
                _link(s3_server, f"s3://{bucket}/out", "results"),
                _link(s3_server, f"s3://{bucket}/ref", "reference", read_only=True),
            )
            d.spec.file_system_mounts.add(host_path=str(shared), mount_path="/mnt/efs")
            controller.push(d)
            obs = await controller.wait_status(sid, RUNNING, timeout=90)
            assert [state_of(s) for s in obs.data_links] == ["mounted", "read-only"]
            cid = _podman("ps", "-q", "--filter", f"name=studios-{sid}").stdout.split()[0]
            script = (
                "echo from-container > /workspace/data/results/c.txt && "
                "cat /workspace/data/reference/input.txt && cat /mnt/efs/shared.txt && "
                "echo efs > /mnt/efs/from-container.txt && echo mine > /mine.txt && "
                "(echo x > /workspace/data/reference/x.txt; echo ro=$?) 2>&1"
            )
            out = _podman("exec", cid, "sh", "-c", script)
            assert out.returncode == 0, out.stderr
            assert "input\n" in out.stdout and "shared\n" in out.stdout
            assert "Read-only file system" in out.stdout and "ro=1" in out.stdout
            fs.invalidate_cache()
            assert fs.cat_file(f"{bucket}/out/c.txt") == b"from-container\n"
            assert not fs.exists(f"{bucket}/ref/x.txt")
            assert (shared / "from-container.txt").read_bytes() == b"efs\n"
            # The overlay's upper dir has the mount point directories, never their content.
            upper = Path(obs.volume.path) / "upper"
            assert (upper / "mine.txt").exists()
            assert not list((upper / "workspace" / "data").rglob("*.txt"))
            assert not list((upper / "mnt").rglob("*.txt"))

            controller.push(
                desired(sid, status=pb.DESIRED_STATUS_STOPPED, checkpoint_base_uri=base)
            )
            await controller.wait_status(sid, STOPPED, timeout=90)
            await _released(controller, sid)
            assert not mount_points_under(agent.state.root)
            final = [e for e in controller.messages("checkpoint") if e.status == FINALIZED][-1]
            paths = _manifest_paths(final.uri)
            assert "mine.txt" in paths
            assert not [p for p in paths if p.startswith(("workspace/data/", "mnt/efs/"))]
    finally:
        _cleanup(config.state_dir)


async def test_store_gone_the_session_survives_and_stops(
    controller: FakeController, dl_agent: Agent, tmp_path: Path
) -> None:
    srv = S3Server(tmp_path / "weed", require_weed())
    srv.start()
    try:
        bucket = _bucket(srv)
        _fs(srv).pipe_file(f"{bucket}/later.txt", b"later\n")
        sid = "d1a10004"
        controller.push(_with_links(desired(sid), _link(srv, f"s3://{bucket}", "gone")))
        obs = await controller.wait_status(sid, RUNNING)
        srv.stop()
        proc = await asyncio.create_subprocess_exec(
            "cat",
            str(Path(obs.root_dir) / "workspace" / "data" / "gone" / "later.txt"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert await asyncio.wait_for(proc.wait(), timeout=90) != 0
        # The disk accounting ticks (every 0.5 s here) never walk into the dead mount.
        await asyncio.sleep(2)
        latest = controller.latest(sid)
        assert latest is not None and latest.status == RUNNING
        t0 = time.monotonic()
        controller.push(desired(sid, status=pb.DESIRED_STATUS_STOPPED))
        stopped = await controller.wait_status(sid, STOPPED, timeout=90)
        assert time.monotonic() - t0 < 60
        assert [state_of(s) for s in stopped.data_links] == ["unmounted"]
        assert not mount_points_under(dl_agent.state.root)
    finally:
        srv.stop()


async def test_a_dead_mount_helper_is_reported_and_the_session_still_stops(
    s3_server: S3Server, controller: FakeController, dl_agent: Agent
) -> None:
    import psutil

    bucket = _bucket(s3_server)
    sid = "d1a10005"
    controller.push(_with_links(desired(sid), _link(s3_server, f"s3://{bucket}", "dies")))
    obs = await controller.wait_status(sid, RUNNING)
    assert state_of(obs.data_links[0]) == "mounted"
    host_path = str(dl_agent.state.session_dir(sid) / "datalinks" / "dies")
    [helper] = [
        p for p in psutil.process_iter(["cmdline"]) if host_path in (p.info["cmdline"] or [])
    ]
    helper.kill()
    helper.wait(10)

    def failed() -> pb.SessionObserved | None:
        o = controller.latest(sid)
        return o if o is not None and state_of(o.data_links[0]) == "failed" else None

    obs = await controller.wait_for(failed, timeout=20)
    assert obs.status == RUNNING
    assert "mount helper ended" in obs.data_links[0].message and "id-dies" in obs.message
    controller.push(desired(sid, status=pb.DESIRED_STATUS_STOPPED))
    await controller.wait_status(sid, STOPPED, timeout=60)
    assert not mount_points_under(dl_agent.state.root)
