"""Custom environments built into images derived FROM a studio's template image (issue 15,
agent/images/env_builder.py), with real podman builds on the project's jupyterlab image:
a PyPI and a Debian package installed and usable as the image's user, the second request
cached, concurrent requests building once; a package that does not exist, the time and
the disk limit, conda without or with an unreachable channel, the template's Python or
pip not fitting, a missing template: each fails naming it and tags nothing; a build an
agent abandoned is found and ended, and builds again. Every image a test tags is removed
by that test (its own references only)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from agent.images import env_builder
from agent.images.builder import image_states
from agent.images.definitions import default_definitions_dir, load_definitions
from agent.images.env_builder import (
    EnvBuildFailed,
    EnvBuildLimits,
    EnvBuildResult,
    _reason,
    build_environment,
    kill_leftover_build,
)
from agent.images.environment import (
    LABEL_ENV_HASH,
    environment_hash,
    environment_reference,
    parse_environment,
)
from tests.integration import require

JUPYTERLAB = "studios/jupyterlab:4.6-0.1"
CODE_SERVER = "studios/code-server:4.139-0.1"
REPO_ROOT = Path(__file__).resolve().parents[3]
LIMITS = EnvBuildLimits(timeout_seconds=600.0)

pytestmark = pytest.mark.podman


def _podman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=False)


def _require_template(template: str = JUPYTERLAB) -> None:
    require(os.geteuid() == 0, "studio images are in root's podman storage: run as root")
    require(_podman("version").returncode == 0, "podman is not usable here")
    require(
        _podman("image", "exists", f"localhost/{template}").returncode == 0,
        f"localhost/{template} is not built (studio-agent images build {template})",
    )


def _reference(text: str, template: str = JUPYTERLAB) -> str:
    """Where `text`'s image would be tagged: what a failed build must not leave."""
    image_id = _podman("image", "inspect", "--format", "{{.Id}}", f"localhost/{template}")
    return environment_reference(
        f"localhost/{template}", environment_hash(parse_environment(text), image_id.stdout.strip())
    )


def _exists(reference: str) -> bool:
    return _podman("image", "exists", reference).returncode == 0


def _group_gone(pgid: int, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = []
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except (OSError, psutil.Error):
                continue
        if not alive:
            return True
        time.sleep(0.2)
    return False


def _working_containers(env_hash: str) -> list[str]:
    """Storage containers podman build left whose image carries this environment."""
    out = _podman("ps", "--all", "--external", "--format", "json")
    found = []
    for c in json.loads(out.stdout or "[]"):
        labels = _podman(
            "image", "inspect", "--format", "{{json .Labels}}", str(c.get("ImageID") or "")
        )
        if labels.returncode == 0 and env_hash in labels.stdout:
            found.append(str(c["Id"]))
    return found


@pytest.fixture
def tagged() -> Iterator[list[str]]:
    """References the test built: removed afterwards, and nothing else."""
    refs: list[str] = []
    yield refs
    for ref in refs:
        if _exists(ref):
            _podman("rmi", ref)


@pytest.fixture
def failing_build() -> Iterator[Callable[[str], str]]:
    """For a test whose build must fail: any image of its environment an earlier failed
    run left is removed before it builds (it would be a cached success) and whatever this
    run leaves is removed after it, so one failure stays one failure."""
    hashes: list[str] = []

    def prepare(text: str) -> str:
        hashes.append(environment_hash_of(text))
        _remove_intermediates(hashes[-1])
        return text

    yield prepare
    for env_hash in hashes:
        _remove_intermediates(env_hash)


def _remove_intermediates(env_hash: str) -> None:
    """The untagged images a test's build left (a cancelled build keeps them, as podman's
    layer cache for the next build of the same environment)."""
    found = _podman(
        "images", "--all", "--quiet", "--no-trunc", "--filter", f"label=studios.env-hash={env_hash}"
    )
    ids = sorted(set(found.stdout.split()))
    if ids:
        _podman("rmi", *ids)


async def _build(
    text: str,
    tmp_path: Path,
    limits: EnvBuildLimits = LIMITS,
    template: str = JUPYTERLAB,
    lines: list[str] | None = None,
    pids: list[int] | None = None,
) -> EnvBuildResult:
    return await build_environment(
        template,
        text,
        limits=limits,
        log_path=tmp_path / "logs" / "build.log",
        on_line=None if lines is None else lines.append,
        on_process=None if pids is None else (lambda pid, _ct: pids.append(pid)),
    )


async def _fails(
    text: str,
    tmp_path: Path,
    limits: EnvBuildLimits = LIMITS,
    template: str = JUPYTERLAB,
    pids: list[int] | None = None,
) -> EnvBuildFailed:
    with pytest.raises(EnvBuildFailed) as info:
        await _build(text, tmp_path, limits, template, pids=pids)
    return info.value


async def test_pip_and_apt_packages_built_cached_and_built_once(
    tmp_path: Path, tagged: list[str]
) -> None:
    _require_template()
    text = "dependencies:\n  - apt: [jq]\n  - pip: [tomli-w==1.0.0]\n"
    lines: list[str] = []
    # Two requests at once (an agent starting two studios of one environment): one build.
    started = time.monotonic()
    first, second = await asyncio.gather(
        _build(text, tmp_path, lines=lines), _build(text, tmp_path / "other")
    )
    cold = time.monotonic() - started
    tagged.append(first.reference)
    assert first.reference == second.reference == _reference(text)
    assert sorted([first.cached, second.cached]) == [False, True]
    built = first if not first.cached else second
    assert built.log_path is not None and built.log_path.stat().st_mode & 0o777 == 0o600
    log = built.log_path.read_text()
    assert log.startswith("# The Studios environment ") and "FROM " in log.splitlines()[2]
    assert "Successfully installed tomli-w-1.0.0" in log
    assert any("Setting up jq" in line for line in lines) or built is second

    # The same environment written differently: the same image, from the cache.
    again = await _build(
        "# reordered\ndependencies:\n  - pip:\n    - tomli_w == 1.0.0\n  - apt: [ jq ]\n",
        tmp_path,
    )
    # Cached: nothing was built (no log), whatever the time on a busy host.
    assert again.cached and again.reference == first.reference and again.log_path is None
    print(f"cold build {cold:.1f} s, cached {again.seconds:.2f} s")

    # The template's user, entrypoint and working directory, with both packages.
    out = _podman(
        "run",
        "--rm",
        "--entrypoint",
        "/bin/sh",
        first.reference,
        "-c",
        "id -u; pwd; python3 -c 'import tomli_w; print(tomli_w.dumps({\"a\": 1}).strip())'; "
        "jq -n 6*7",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:4] == ["1000", "/workspace", "a = 1", "42"], out.stdout
    config = json.loads(_podman("image", "inspect", first.reference).stdout)[0]["Config"]
    template = json.loads(_podman("image", "inspect", f"localhost/{JUPYTERLAB}").stdout)[0]
    assert config["Entrypoint"] == template["Config"]["Entrypoint"]
    assert config["Cmd"] == template["Config"]["Cmd"]
    assert config["Labels"]["studios.env-hash"] == first.env_hash
    # `studio-agent images list` shows it as an environment of its template.
    rows = image_states(load_definitions(default_definitions_dir()))
    [row] = [r for r in rows if r["reference"] == first.reference]
    assert row["state"] == "environment" and row["template"].endswith(JUPYTERLAB), row


async def test_missing_pypi_package_is_named_and_nothing_tagged(tmp_path: Path) -> None:
    _require_template()
    text = "dependencies:\n  - pip: [tomli-w==1.0.0, studios-no-such-package-q7x]\n"
    exc = await _fails(text, tmp_path)
    assert exc.reason == "package 'studios-no-such-package-q7x' not found on PyPI"
    lines = str(exc).splitlines()
    assert lines[0] == exc.reason and "last lines of the build log" in lines[1]
    assert any("No matching distribution found" in line for line in lines[2:])
    assert exc.log_path is not None and "No matching distribution" in exc.log_path.read_text()
    assert not _exists(_reference(text))
    assert _working_containers(environment_hash_of(text)) == []


def environment_hash_of(text: str) -> str:
    ref = _reference(text)
    image_id = _podman("image", "inspect", "--format", "{{.Id}}", f"localhost/{JUPYTERLAB}")
    h = environment_hash(parse_environment(text), image_id.stdout.strip())
    assert ref.endswith(h[:16])
    return h


async def test_missing_debian_package_is_named(tmp_path: Path) -> None:
    _require_template()
    text = "dependencies:\n  - apt: [studios-no-such-deb]\n"
    exc = await _fails(text, tmp_path)
    assert exc.reason == "Debian package 'studios-no-such-deb' not found"
    assert not _exists(_reference(text))


async def test_time_limit_ends_the_whole_build(tmp_path: Path) -> None:
    _require_template()
    text = "dependencies:\n  - pip: [tomli-w==1.0.0, six==1.16.0]\n"
    pids: list[int] = []
    started = time.monotonic()
    exc = await _fails(text, tmp_path, EnvBuildLimits(timeout_seconds=1.0), pids=pids)
    assert exc.reason == "build exceeded its time limit of 1 s", str(exc)
    assert time.monotonic() - started < 60
    assert len(pids) == 1 and _group_gone(pids[0])
    assert not _exists(_reference(text))
    assert _working_containers(environment_hash_of(text)) == []


async def test_disk_limit_ends_the_build(
    tmp_path: Path, failing_build: Callable[[str], str]
) -> None:
    _require_template()
    # docutils: about 2 MB downloaded and 6 MB installed, against 1 MiB.
    text = failing_build("dependencies:\n  - pip: [docutils==0.21.2]\n")
    exc = await _fails(text, tmp_path, EnvBuildLimits(timeout_seconds=600, disk_bytes=2**20))
    assert exc.reason.startswith("build exceeded its disk limit of 1 MiB (wrote "), exc.reason
    assert not _exists(_reference(text))


async def test_disk_limit_holds_a_build_quicker_than_its_sampling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_build: Callable[[str], str]
) -> None:
    """CI of stop 26: pip installed and podman committed docutils between two of the
    meter's samples, and the build was tagged. With sampling pushed past the build's end,
    only the measurement when podman exits can catch it."""
    _require_template()
    monkeypatch.setattr(env_builder, "_DISK_EVERY", 3600.0)
    text = failing_build("dependencies:\n  - pip: [docutils==0.21.2]\n")
    exc = await _fails(text, tmp_path, EnvBuildLimits(timeout_seconds=600, disk_bytes=2**20))
    assert exc.reason.startswith("build exceeded its disk limit of 1 MiB (wrote "), exc.reason
    assert not _exists(_reference(text))
    env_hash = environment_hash_of(text)
    label = f"label={LABEL_ENV_HASH}={env_hash}"
    assert _podman("images", "--all", "--quiet", "--filter", label).stdout == ""
    assert _working_containers(env_hash) == []
    log = (tmp_path / "logs" / "build.log").read_text()
    assert "measured when podman exited" in log


async def test_conda_package_without_a_channel_names_the_setting(tmp_path: Path) -> None:
    exc = await _fails("dependencies: [python=3.11, numpy>=1.26, {pip: [six]}]\n", tmp_path)
    assert exc.reason == (
        "conda package 'numpy' needs a conda channel and this agent has none configured "
        "(setting conda_channels); list it under pip: instead"
    )
    assert exc.log_path is None


async def test_unreachable_conda_channel_is_named(tmp_path: Path) -> None:
    _require_template()
    limits = EnvBuildLimits(conda_channels=("http://127.0.0.1:9/",))
    exc = await _fails("dependencies: [numpy]\n", tmp_path, limits)
    assert exc.reason.startswith(
        "conda channel http://127.0.0.1:9/ is not reachable from this host"
    ), exc.reason


async def test_not_yaml_is_named(tmp_path: Path) -> None:
    exc = await _fails("dependencies: [six\n", tmp_path)
    assert exc.reason.startswith("not YAML: line 2 column 1: "), exc.reason


async def test_missing_template_names_the_build_command(tmp_path: Path) -> None:
    _require_template()
    exc = await _fails("dependencies: [{pip: [six]}]\n", tmp_path, template="studios/nope:1-0.1")
    assert exc.reason == (
        "template image localhost/studios/nope:1-0.1 is not on this host: build it with "
        "studio-agent images build studios/nope:1-0.1 (images are never pulled)"
    )


async def test_python_version_of_the_template_is_checked(tmp_path: Path) -> None:
    _require_template()
    exc = await _fails("dependencies: [python>=3.12, {pip: [six]}]\n", tmp_path)
    assert "'python>=3.12'" in exc.reason and "Python 3.11." in exc.reason, exc.reason


async def test_template_without_pip_is_named(tmp_path: Path) -> None:
    _require_template(CODE_SERVER)
    exc = await _fails("dependencies: [{pip: [six]}]\n", tmp_path, template=CODE_SERVER)
    assert "has no 'python3 -m pip'" in exc.reason, exc.reason


_ABANDONED = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from agent.images.env_builder import EnvBuildLimits, build_environment

    def on_process(pid, create_time):
        Path(sys.argv[2]).write_text(json.dumps([pid, create_time]))

    asyncio.run(build_environment(
        sys.argv[3], sys.argv[1], limits=EnvBuildLimits(timeout_seconds=600),
        log_path=Path(sys.argv[2] + ".log"), on_process=on_process))
    """
)


async def test_abandoned_build_is_ended_and_builds_again(tmp_path: Path, tagged: list[str]) -> None:
    _require_template()
    text = "dependencies:\n  - python>=3.9\n  - apt: [jq]\n  - pip: [six==1.16.0]\n"
    record = tmp_path / "build.json"
    # An agent process that dies mid-build (SIGKILL: no cleanup of its own).
    agent = subprocess.Popen(
        [sys.executable, "-c", _ABANDONED, text, str(record), JUPYTERLAB], cwd=REPO_ROOT
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            log = Path(f"{record}.log")
            if record.exists() and log.exists() and "apt-get" in log.read_text().split("STEP")[-1]:
                break
            assert agent.poll() is None, "the build ended before it could be abandoned"
            await asyncio.sleep(0.2)
        else:
            pytest.fail("the build did not reach its apt step")
    finally:
        agent.kill()
        agent.wait()
    pid, create_time = json.loads(record.read_text())
    assert psutil.pid_exists(pid), "podman build died with the agent"
    assert not kill_leftover_build(pid, create_time + 5), "a different process was killed"
    assert kill_leftover_build(pid, create_time)
    assert _group_gone(pid)
    assert not kill_leftover_build(pid, create_time)

    # Built again (podman's layer cache keeps what was done), and complete.
    result = await _build(text, tmp_path)
    tagged.append(result.reference)
    assert not result.cached
    out = _podman("run", "--rm", result.reference, "python3", "-c", "import six; print(1)")
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr
    assert _working_containers(result.env_hash) == []


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        (
            [
                "ERROR: Could not find a version that satisfies the requirement six==99.0 "
                "(from versions: 0.9.0, 1.16.0, 1.17.0)",
                "ERROR: No matching distribution found for six==99.0",
            ],
            "no version of package 'six' on PyPI matches '==99.0'",
        ),
        (
            ["E: Version '9.9' for 'jq' was not found"],
            "Debian package 'jq' has no version '9.9'",
        ),
        (
            ["error: externally-managed-environment"],
            "the template image's python3 is Debian's (externally managed): pip packages "
            "need a template with its own Python environment, e.g. jupyterlab",
        ),
        (
            [
                "WARNING: Retrying (Retry(total=4)) after connection broken by "
                "'NewConnectionError: Failed to establish a new connection: [Errno 101] "
                "Network is unreachable'",
            ],
            "a package registry is not reachable from this host: WARNING: Retrying "
            "(Retry(total=4)) after connection broken by 'NewConnectionError: Failed to "
            "establish a new connection: [Errno 101] Network is unreachable'",
        ),
        (
            ['Error: building at STEP "RUN /bin/sh -c false": while running runtime: exit 1'],
            "the build failed at RUN /bin/sh -c false: while running runtime: exit 1",
        ),
        ([], "podman build exited with status 125"),
    ],
)
def test_what_a_failed_log_says(output: list[str], reason: str) -> None:
    """The one-line causes read from podman's output (pip's and apt's own lines)."""
    assert _reason(output, 125) == reason


async def test_cancelled_build_ends_and_tags_nothing(tmp_path: Path) -> None:
    """A build whose caller goes away (the studio deleted meanwhile) goes with it."""
    _require_template()
    text = "dependencies:\n  - python>=3.8\n  - apt: [jq]\n"
    pids: list[int] = []
    log = tmp_path / "logs" / "build.log"
    task = asyncio.ensure_future(_build(text, tmp_path, pids=pids))
    try:
        deadline = time.monotonic() + 120
        while not (pids and log.exists() and "apt-get" in log.read_text().split("STEP")[-1]):
            assert not task.done(), "the build ended before it could be cancelled"
            assert time.monotonic() < deadline, "the build did not reach its apt step"
            await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _group_gone(pids[0])
        assert not _exists(_reference(text))
        assert _working_containers(environment_hash_of(text)) == []
    finally:
        _remove_intermediates(environment_hash_of(text))
