"""Building a studio's custom environment into an image derived FROM its template image
(issue 15), on the agent's event loop: every subprocess is asyncio's, every file walk runs
in a thread.

`build_environment` parses the environment file (agent.images.environment), finds the
template image in this host's podman storage (never pulled: a missing one fails naming
`studio-agent images build`), and returns the derived image's reference. The image is
named by the hash of the environment's content and the template image's id, so:

- cached: an image with that reference whose `studios.env-hash` label matches is used as
  it is, nothing built; the same environment with its packages in another order, other
  comments or whitespace is the same image;
- one build per hash in this process (an asyncio lock per hash: a second request waits
  and then finds the image), one build per host (the host lock file of
  `studio-agent images build`, taken by polling so the loop never blocks; a build that
  waits says so through `on_line`).

What the build does (`podman build --pull=never --network=host --layers`, a generated
Containerfile FROM the template image's id): Debian packages with apt as root, conda
packages with the image's micromamba/mamba/conda from the operator's channels, then pip
packages as the template's own user with `python3 -m pip` (the template's python3: in
the project's jupyterlab and r-ide images the venv /opt/jupyter, owned by `studio`, which
the kernel imports from; code-server and xpra have only Debian's python3 without pip, so
pip packages fail there naming `python3 -m pip`, while Debian packages, e.g.
`python3-numpy`, work on every template). The template's ENTRYPOINT, CMD, WORKDIR, ENV
and USER carry over. The host's CA bundle is bound into RUN steps as builder.py does.

Conda: these hosts reach no conda channel, so the tested path is pip plus apt. Conda
packages other than python and pip need the operator's `conda_channels`; each is checked
reachable (GET `<channel>/noarch/repodata.json`) before building, and the template image
must have micromamba, mamba or conda.

Limits (EnvBuildLimits), each ending the build's whole process group and the build
container's processes, which podman starts in sessions of their own:
- time: from the moment podman starts (waiting for the host lock does not count);
- disk: what the build writes in podman's storage, measured about every second as the
  allocated size of the `diff` directories of the overlay layers that appeared since the
  build started and sit on top of the template image (their `lower` names the template's
  top layer; other containers appearing meanwhile are not counted). Limits of the
  measure: only the overlay driver is measured (other drivers: no disk limit, said in the
  log); a step's files count while its working container holds them and again once
  committed as a layer, so the figure is the build's peak footprint, up to about twice the
  installed size; a burst written within a second may exceed the limit before it is seen,
  but what the build committed is measured once more when podman exits, so a build
  quicker than the interval still fails on it;
  podman's temporary files outside its storage (/var/tmp) are not counted.

The log: the generated Containerfile, then podman's whole output, at most _LOG_CAP bytes
(then "[log truncated]"), mode 0600. podman writes into a file in the build's scratch
directory, not into a pipe to the agent: an agent that dies mid-build does not take
podman down with a broken pipe halfway through a step, so `kill_leftover_build` finds the
build whole and ends it cleanly. A failure raises EnvBuildFailed: one line naming the
cause, then the log's last lines. A failed build tags nothing and removes its
intermediate images (each carries its hash: only the same environment could reuse them,
and would fail alike); a build ended by `kill_leftover_build` or by its caller's
cancellation keeps them as podman's layer cache, so building it again resumes after the
last finished step. The template image is untouched. The scratch directory a dead
agent's build left is removed by a later build.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import psutil
from packaging.requirements import InvalidRequirement, Requirement

from agent.errors import AgentError
from agent.images.builder import BUILD_CA_PATH, host_ca_bundle, host_lock_path
from agent.images.environment import (
    LABEL_ENV_HASH,
    EnvironmentFileError,
    EnvironmentSpec,
    containerfile,
    environment_hash,
    environment_reference,
    parse_environment,
    python_mismatch,
)

__all__ = [
    "EnvBuildFailed",
    "EnvBuildLimits",
    "EnvBuildResult",
    "build_environment",
    "kill_leftover_build",
]

_LOG_CAP: Final = 4 * 2**20
_LOG_TAIL: Final = 20
_PODMAN_TIMEOUT: Final = 120.0
_CHANNEL_TIMEOUT: Final = 10.0
# After the build container's processes are killed, podman ends the step and removes its
# working containers itself; this long at most, then its group is killed outright.
_STOP_GRACE: Final = 10.0
_POLL: Final = 0.25
_DISK_EVERY: Final = 1.0
# podman's output in the scratch file beyond this: the build is stopped (a runaway).
_RAW_CAP: Final = 256 * 2**20
_SCRATCH_PREFIX: Final = "studios-env-"
_PROBE: Final = (
    'python3 -c "import platform; print(platform.python_version())" 2>/dev/null || echo none; '
    "python3 -m pip --version >/dev/null 2>&1 && echo pip || echo nopip; "
    "command -v micromamba || command -v mamba || command -v conda || echo noconda"
)


@dataclass(frozen=True, slots=True)
class EnvBuildLimits:
    timeout_seconds: float = 1800.0
    disk_bytes: int = 8 * 2**30
    # The operator's conda channel URLs; none by default (none is reachable from here).
    conda_channels: tuple[str, ...] = ()


@dataclass(slots=True)
class EnvBuildResult:
    reference: str
    env_hash: str
    cached: bool
    seconds: float
    log_path: Path | None


class EnvBuildFailed(AgentError):
    """The environment was not built. str(): the cause on one line, then the log's last
    lines; `reason` is the cause alone, `log_path` the whole log (None: no build ran)."""

    def __init__(self, reason: str, log_path: Path | None = None, tail: Iterable[str] = ()):
        lines = list(tail)
        text = reason
        if lines:
            text += f"\nlast lines of the build log ({log_path}):\n" + "\n".join(lines)
        super().__init__(text)
        self.reason = reason
        self.log_path = log_path


# One lock per environment hash, alive while someone holds or waits for it.
_hash_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def _fmt_seconds(s: float) -> str:
    return f"{s:g} s"


async def _run(*argv: str) -> tuple[int, str, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise EnvBuildFailed(f"{argv[0]} is not installed on this host") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), _PODMAN_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise EnvBuildFailed(
            f"{' '.join(argv[:3])} did not answer within {_fmt_seconds(_PODMAN_TIMEOUT)}"
        ) from None
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def _inspect(reference: str) -> dict[str, Any] | None:
    rc, out, _ = await _run("podman", "image", "inspect", reference)
    if rc != 0:
        return None
    data = json.loads(out or "[]")
    return data[0] if data else None


def _labels(image: dict[str, Any]) -> dict[str, str]:
    labels = image.get("Labels") or (image.get("Config") or {}).get("Labels") or {}
    return {str(k): str(v) for k, v in labels.items()}


def _local_reference(template_reference: str) -> str:
    """What podman finds: the catalogue's `studios/x:t` is `localhost/studios/x:t`."""
    ref = template_reference.strip()
    first = ref.split("/", 1)[0]
    if "/" in ref and ("." in first or ":" in first or first == "localhost"):
        return ref
    return f"localhost/{ref}"


async def _cached(reference: str, env_hash: str) -> bool:
    image = await _inspect(reference)
    return image is not None and _labels(image).get(LABEL_ENV_HASH) == env_hash


@contextlib.asynccontextmanager
async def _host_lock(path: Path, on_wait: Callable[[], None]) -> AsyncIterator[None]:
    """builder.py's host lock, polled: a blocking flock would stop the event loop (and a
    flock in a thread cannot be cancelled)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # noqa: ASYNC230 - opening the lock file does not block
        waited = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    waited = True
                    on_wait()
                await asyncio.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


async def _check_channels(channels: tuple[str, ...]) -> None:
    timeout = aiohttp.ClientTimeout(total=_CHANNEL_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for channel in channels:
            url = f"{channel.rstrip('/')}/noarch/repodata.json"
            try:
                # Only the status: a channel's repodata can be hundreds of MB.
                async with session.get(url) as response:
                    status = response.status
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                detail = str(exc) or type(exc).__name__
                raise EnvBuildFailed(
                    f"conda channel {channel} is not reachable from this host ({detail})"
                ) from None
            if status != 200:
                raise EnvBuildFailed(
                    f"conda channel {channel} is not usable: GET {url} answered {status}"
                )


@dataclass(slots=True)
class _Probe:
    python: str | None
    pip: bool
    conda: str | None


async def _probe(template_id: str) -> _Probe:
    """What the template image has, asked of the image itself as its own user."""
    rc, out, err = await _run(
        "podman",
        "run",
        "--rm",
        "--pull=never",
        "--network=none",
        "--entrypoint",
        "/bin/sh",
        template_id,
        "-c",
        _PROBE,
    )
    lines = out.split()
    if rc != 0 or len(lines) != 3:
        detail = (err.strip().splitlines() or [f"exit status {rc}"])[-1]
        raise EnvBuildFailed(f"the template image could not be examined: {detail}")
    python, pip, conda = lines
    return _Probe(
        None if python == "none" else python,
        pip == "pip",
        None if conda == "noconda" else conda,
    )


def _check_probe(spec: EnvironmentSpec, probe: _Probe, template: str) -> None:
    wants_python = spec.wants_pip() or spec.python_specifier() is not None
    if wants_python and probe.python is None:
        raise EnvBuildFailed(f"the template image {template} has no python3")
    if probe.python is not None:
        mismatch = python_mismatch(spec, probe.python)
        if mismatch:
            raise EnvBuildFailed(mismatch)
    if spec.wants_pip() and not probe.pip:
        raise EnvBuildFailed(
            f"the template image {template} has no 'python3 -m pip' for the pip packages "
            "(use a template with its own Python environment, e.g. jupyterlab, or Debian's "
            "python3-* packages under apt:)"
        )
    conda = spec.conda_to_install()
    if conda and probe.conda is None:
        raise EnvBuildFailed(
            f"conda package {_conda_name(conda[0])!r} needs micromamba, mamba or conda in "
            f"the template image {template}, which has none"
        )


def _conda_name(package: str) -> str:
    return re.split(r"[\s<>=!~]", package, maxsplit=1)[0]


class _Log:
    """The build's log: capped, 0600, and the last lines kept for the error message."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        self._file = os.fdopen(fd, "w", encoding="utf-8", errors="replace")
        self.path = path
        self.written = 0
        self.truncated = False
        self.tail: deque[str] = deque(maxlen=_LOG_TAIL)
        self.lines: list[str] = []

    def write_line(self, line: str) -> None:
        if line.strip():
            self.tail.append(line)
        if self.truncated:
            return
        data = line + "\n"
        size = len(data.encode("utf-8", "replace"))
        if self.written + size > _LOG_CAP:
            self._file.write("[log truncated]\n")
            self.truncated = True
        else:
            self._file.write(data)
            self.written += size
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# ---- killing a build: podman's process group and its containers' processes


def _outside_descendants(pid: int) -> list[psutil.Process]:
    """The leader's descendants in other process groups: the build container's
    processes, which runc starts in a session of their own and a group kill misses."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for child in children:
        try:
            if os.getpgid(child.pid) != pid:
                out.append(child)
        except OSError:
            continue
    return out


def _kill(processes: Iterable[psutil.Process]) -> None:
    for p in processes:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _kill_group(pid: int) -> None:
    _kill(_outside_descendants(pid))
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies keep the group until their parent reaps them; they hold nothing.
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


async def _stop_build(proc: asyncio.subprocess.Process) -> bool:
    """End a running podman build: its container's processes first (podman then ends the
    step and removes its working containers), the whole group after _STOP_GRACE. True
    when it had to be killed outright."""
    deadline = time.monotonic() + _STOP_GRACE
    while proc.returncode is None and time.monotonic() < deadline:
        _kill(_outside_descendants(proc.pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), _POLL)
    hard = proc.returncode is None
    _kill_group(proc.pid)
    await proc.wait()
    for _ in range(40):
        if not _group_alive(proc.pid):
            break
        _kill_group(proc.pid)
        await asyncio.sleep(0.1)
    return hard


def kill_leftover_build(pid: int, create_time: float) -> bool:
    """End a build an earlier agent process started (its podman's pid and psutil
    create_time, as `on_process` gave them) if that process still runs; True when it
    did. Returns at once: the container's processes are killed now (podman then cleans
    up after itself), the group, if still there, after _STOP_GRACE in a thread."""
    if pid <= 1:
        return False
    try:
        leader = psutil.Process(pid)
        same = abs(leader.create_time() - create_time) < 0.01
        if not same or leader.status() == psutil.STATUS_ZOMBIE or os.getpgid(pid) != pid:
            return False
    except (psutil.Error, OSError):
        return False
    _kill(_outside_descendants(pid))

    def finish() -> None:
        deadline = time.monotonic() + _STOP_GRACE
        while time.monotonic() < deadline:
            try:
                leader.wait(_POLL)
                break
            except psutil.TimeoutExpired:
                _kill(_outside_descendants(pid))
            except psutil.Error:
                break
        _kill_group(pid)

    threading.Thread(target=finish, name=f"kill-build-{pid}", daemon=True).start()
    return True


async def _remove_leftovers(template_id: str, env_hash: str, since: float | None) -> None:
    """Working containers an ended build of this environment left in storage: those of
    its intermediate images (their label names this hash) and, when `since` is given
    (this process's own build just killed), those FROM the template created since."""
    rc, out, _ = await _run("podman", "ps", "--all", "--external", "--format", "json")
    if rc != 0:
        return
    stale: list[str] = []
    for c in json.loads(out or "[]"):
        names = c.get("Names") or []
        if str(c.get("State", "")).lower() != "storage":
            continue
        if not any("working-container" in str(n) for n in names):
            continue
        image_id = str(c.get("ImageID") or "")
        if since is not None and image_id == template_id and float(c.get("Created") or 0) >= since:
            stale.append(str(c["Id"]))
            continue
        image = await _inspect(image_id) if image_id else None
        if image is not None and _labels(image).get(LABEL_ENV_HASH) == env_hash:
            stale.append(str(c["Id"]))
    if stale:
        await _run("podman", "rm", "--force", *stale)


async def _remove_intermediates(env_hash: str) -> None:
    """A failed build's intermediate images: each carries its hash (the LABEL comes
    first), so only a build of the same environment could reuse them, and it would fail
    the same way. (An agent killed mid-build never gets here: its restarted build reuses
    them.)"""
    rc, out, _ = await _run(
        "podman",
        "images",
        "--all",
        "--quiet",
        "--no-trunc",
        "--filter",
        f"label={LABEL_ENV_HASH}={env_hash}",
    )
    ids = sorted(set(out.split())) if rc == 0 else []
    if ids:
        # Children before parents is podman's business: rmi of the set handles the order.
        await _run("podman", "rmi", *ids)


# ---- disk use


@dataclass(slots=True)
class _DiskMeter:
    """The bytes this build wrote in podman's overlay storage (see the module's doc)."""

    layers_dir: Path
    template_link: str
    before: frozenset[str]
    ours: set[str] = field(default_factory=set)
    others: set[str] = field(default_factory=set)

    def measure(self) -> int:
        try:
            names = {e.name for e in os.scandir(self.layers_dir) if e.is_dir()}
        except OSError:
            return 0
        for name in names - self.before - self.ours - self.others:
            try:
                lower = (self.layers_dir / name / "lower").read_text()
            except OSError:
                continue  # not written yet: looked at again next time
            if f"l/{self.template_link}" in lower.split(":"):
                self.ours.add(name)
            else:
                self.others.add(name)
        self.ours &= names
        seen: set[tuple[int, int]] = set()
        return sum(_tree_size(self.layers_dir / n / "diff", seen) for n in self.ours)


def _tree_size(top: Path, seen: set[tuple[int, int]]) -> int:
    total = 0
    stack = [str(top)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
    return total


def _disk_failure(limit: int, used: int) -> str:
    return f"build exceeded its disk limit of {_fmt_bytes(limit)} (wrote {_fmt_bytes(used)})"


async def _disk_meter(template: dict[str, Any]) -> tuple[_DiskMeter | None, str]:
    rc, out, _ = await _run(
        "podman", "info", "--format", "{{.Store.GraphRoot}} {{.Store.GraphDriverName}}"
    )
    parts = out.split()
    if rc != 0 or len(parts) != 2:
        return None, "the disk limit is not enforced: podman info did not name its storage"
    root, driver = parts
    upper = str(((template.get("GraphDriver") or {}).get("Data") or {}).get("UpperDir") or "")
    if driver != "overlay" or not upper:
        return None, f"the disk limit is not enforced: storage driver {driver} is not overlay"
    layers = Path(root) / "overlay"
    try:
        link = (Path(upper).parent / "link").read_text().strip()
        before = await asyncio.to_thread(lambda: frozenset(os.listdir(layers)))
    except OSError as exc:
        return None, f"the disk limit is not enforced: {layers}: {exc.strerror}"
    return _DiskMeter(layers, link, before), ""


# ---- what a failed build's log says


_PIP_MISSING = re.compile(r"No matching distribution found for (.+?)\s*$")
_PIP_VERSIONS = re.compile(
    r"Could not find a version that satisfies the requirement .+\(from versions: (.*)\)"
)
_APT_MISSING = re.compile(r"E: Unable to locate package (\S+)")
_APT_VERSION = re.compile(r"E: Version '([^']+)' for '([^']+)' was not found")
_NET = re.compile(
    r"Failed to establish a new connection|Temporary failure in name resolution|"
    r"Network is unreachable|Could not resolve '|Failed to fetch|SSLError|ProxyError"
)
_STEP = re.compile(r'Error: building at STEP "(.+?)": (.+)$')


def _reason(lines: list[str], status: int) -> str:
    for line in lines:
        m = _PIP_MISSING.search(line)
        if m:
            versions = next((v.group(1) for x in lines if (v := _PIP_VERSIONS.search(x))), "")
            try:
                req = Requirement(m.group(1))
            except InvalidRequirement:
                return f"package {m.group(1)!r} not found on PyPI"
            if req.specifier and versions.strip() not in ("", "none"):
                return f"no version of package {req.name!r} on PyPI matches {str(req.specifier)!r}"
            return f"package {req.name!r} not found on PyPI"
        m = _APT_MISSING.search(line)
        if m:
            return f"Debian package {m.group(1)!r} not found"
        m = _APT_VERSION.search(line)
        if m:
            return f"Debian package {m.group(2)!r} has no version {m.group(1)!r}"
        if "externally-managed-environment" in line:
            return (
                "the template image's python3 is Debian's (externally managed): pip packages "
                "need a template with its own Python environment, e.g. jupyterlab"
            )
    for line in lines:
        if _NET.search(line):
            return f"a package registry is not reachable from this host: {line.strip()[:300]}"
    for line in reversed(lines):
        m = _STEP.search(line)
        if m:
            return f"the build failed at {m.group(1)[:200]}: {m.group(2)[:200]}"
    return f"podman build exited with status {status}"


# ---- the build


@dataclass(slots=True)
class _Build:
    spec: EnvironmentSpec
    template: str
    template_id: str
    user: str
    env_hash: str
    reference: str
    limits: EnvBuildLimits
    log_path: Path
    on_line: Callable[[str], None]
    on_process: Callable[[int, float], None] | None
    conda_command: str | None


def _scratch_root() -> str:
    # /var/tmp: a build's output does not belong in a RAM-backed /tmp.
    return "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()


def _scratch(containerfile_text: str) -> Path:
    """The build's private directory: its Containerfile, an empty context, podman's
    output."""
    scratch = Path(tempfile.mkdtemp(prefix=_SCRATCH_PREFIX, dir=_scratch_root()))
    (scratch / "Containerfile").write_text(containerfile_text)
    (scratch / "context").mkdir()
    return scratch


def _sweep_scratch() -> None:
    """Scratch directories of builds whose agent died (run under the host lock, so no
    other build is starting; a minute's age spares one that is, should it hold another
    lock file: podman has read its Containerfile by then)."""
    root = Path(_scratch_root())
    for d in root.glob(f"{_SCRATCH_PREFIX}*"):
        with contextlib.suppress(OSError):
            if time.time() - d.lstat().st_mtime > 60:
                shutil.rmtree(d, ignore_errors=True)


async def _podman_build(b: _Build, meter: _DiskMeter | None, meter_note: str) -> None:
    ca = host_ca_bundle()
    try:
        text = containerfile(
            b.spec,
            template_image_id=b.template_id,
            template_reference=b.template,
            user=b.user,
            env_hash=b.env_hash,
            ca_path=BUILD_CA_PATH if ca else None,
            conda_command=b.conda_command,
            conda_channels=b.limits.conda_channels,
        )
    except ValueError as exc:
        raise EnvBuildFailed(f"the template image {b.template} cannot be built on: {exc}") from None
    log = _Log(b.log_path)
    scratch = await asyncio.to_thread(_scratch, text)
    context = scratch / "context"
    try:
        for line in text.splitlines():
            log.write_line(line)
        argv = [
            "podman",
            "build",
            "--pull=never",
            "--network=host",
            "--layers",
            "--force-rm",
            "--file",
            str(scratch / "Containerfile"),
            "--tag",
            b.reference,
        ]
        if ca:
            argv += ["--volume", f"{ca}:{BUILD_CA_PATH}:ro"]
        argv.append(str(context))
        log.write_line(f"$ {' '.join(argv)}")
        if meter_note:
            log.write_line(f"[{meter_note}]")
        await _run_build(b, argv, scratch / "podman.out", log, meter)
    finally:
        log.close()
        await asyncio.to_thread(shutil.rmtree, scratch, True)


async def _run_build(
    b: _Build, argv: list[str], raw_path: Path, log: _Log, meter: _DiskMeter | None
) -> None:
    limits = b.limits
    started_wall = time.time()
    with open(raw_path, "wb") as raw_out:  # noqa: ASYNC230 - a new empty file
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=raw_out,
            stderr=asyncio.subprocess.STDOUT,
            # Its own group, so the whole build can be ended (and found after a restart).
            start_new_session=True,
        )
    started = time.monotonic()
    if b.on_process is not None:
        with contextlib.suppress(psutil.Error):
            b.on_process(proc.pid, psutil.Process(proc.pid).create_time())
    lines: list[str] = []
    failure = ""
    hard = False
    with open(raw_path, "rb") as raw:  # noqa: ASYNC230 - reads of a local file
        pending = b""

        def drain() -> None:
            nonlocal pending
            data = raw.read()
            if not data:
                return
            pending += data
            *complete, pending = pending.split(b"\n")
            for chunk in complete:
                line = chunk.decode("utf-8", "replace").rstrip("\r")
                # pip and apt redraw lines with \r: the last state is what counts.
                line = line.rsplit("\r", 1)[-1]
                lines.append(line)
                del lines[: -_LOG_TAIL * 10]
                log.write_line(line)
                if line.strip():
                    b.on_line(line)

        next_disk = started + _DISK_EVERY
        waiter = asyncio.ensure_future(proc.wait())
        try:
            while not waiter.done():
                await asyncio.wait({waiter}, timeout=_POLL)
                drain()
                now = time.monotonic()
                if now - started > limits.timeout_seconds:
                    failure = (
                        f"build exceeded its time limit of {_fmt_seconds(limits.timeout_seconds)}"
                    )
                elif raw.tell() > _RAW_CAP:
                    failure = f"the build printed more than {_fmt_bytes(_RAW_CAP)}: stopped"
                elif meter is not None and now >= next_disk:
                    t0 = time.monotonic()
                    used = await asyncio.to_thread(meter.measure)
                    # A large tree takes a while to walk: measure less often then.
                    next_disk = time.monotonic() + max(_DISK_EVERY, 3 * (time.monotonic() - t0))
                    if used > limits.disk_bytes:
                        failure = _disk_failure(limits.disk_bytes, used)
                if failure:
                    log.write_line(f"[{failure}: stopping it]")
                    hard = await asyncio.shield(_stop_build(proc))
                    break
        finally:
            if proc.returncode is None:
                # Cancelled (the studio went away): the build goes with it.
                await asyncio.shield(_stop_build(proc))
            waiter.cancel()
            drain()
            if pending:
                log.write_line(pending.decode("utf-8", "replace"))
    status = proc.returncode or 0
    if not failure and status == 0 and meter is not None:
        # A step quicker than the sampling interval can install and commit between two
        # samples; its committed layers are still in storage now, so they are held to the
        # limit here.
        used = await asyncio.to_thread(meter.measure)
        if used > limits.disk_bytes:
            failure = _disk_failure(limits.disk_bytes, used)
            log.write_line(f"[{failure}: measured when podman exited]")
    if failure or status != 0:
        log.write_line(f"[podman build ended with status {status}]")
        if hard or failure:
            await _remove_leftovers(b.template_id, b.env_hash, started_wall - 1)
        # Killed at the very end, podman may have tagged a complete image: it is whole
        # (the tag is its last act), but a failed build leaves nothing tagged.
        if failure and await _cached(b.reference, b.env_hash):
            await _run("podman", "untag", b.reference, b.reference)
        await _remove_intermediates(b.env_hash)
        raise EnvBuildFailed(failure or _reason(lines, status), b.log_path, list(log.tail))
    if not await _cached(b.reference, b.env_hash):
        raise EnvBuildFailed(
            f"podman build succeeded but {b.reference} carries no {LABEL_ENV_HASH} label "
            f"{b.env_hash}",
            b.log_path,
            list(log.tail),
        )


async def build_environment(
    template_reference: str,
    environment_text: str,
    *,
    limits: EnvBuildLimits,
    log_path: Path,
    on_line: Callable[[str], None] | None = None,
    on_process: Callable[[int, float], None] | None = None,
    lock_path: Path | None = None,
) -> EnvBuildResult:
    """The image of `environment_text` on `template_reference`, built unless cached (see
    the module's doc). EnvBuildFailed names what went wrong."""
    started = time.monotonic()
    emit = on_line or (lambda _line: None)
    try:
        spec = parse_environment(environment_text)
    except EnvironmentFileError as exc:
        raise EnvBuildFailed(str(exc)) from None
    conda = spec.conda_to_install()
    if conda and not limits.conda_channels:
        raise EnvBuildFailed(
            f"conda package {_conda_name(conda[0])!r} needs a conda channel and this agent "
            "has none configured (setting conda_channels); list it under pip: instead"
        )
    template = _local_reference(template_reference)
    image = await _inspect(template)
    if image is None:
        fix = (
            f"build it with studio-agent images build {template.removeprefix('localhost/')}"
            if template.startswith("localhost/studios/")
            else "load it into this host's podman storage"
        )
        raise EnvBuildFailed(
            f"template image {template} is not on this host: {fix} (images are never pulled)"
        )
    template_id = str(image["Id"])
    env_hash = environment_hash(spec, template_id, conda_channels=limits.conda_channels)
    reference = environment_reference(template, env_hash)

    def result(cached: bool, log: Path | None) -> EnvBuildResult:
        return EnvBuildResult(
            reference, env_hash, cached, round(time.monotonic() - started, 3), log
        )

    lock = _hash_locks.get(env_hash)
    if lock is None:
        lock = _hash_locks[env_hash] = asyncio.Lock()
    if lock.locked():
        emit("waiting for the same environment's build in progress")
    async with lock:
        if await _cached(reference, env_hash):
            return result(True, None)
        if conda:
            await _check_channels(limits.conda_channels)
        async with _host_lock(
            lock_path or host_lock_path(),
            lambda: emit("waiting for another image build on this host"),
        ):
            if await _cached(reference, env_hash):
                return result(True, None)
            probe = await _probe(template_id)
            _check_probe(spec, probe, template)
            await _remove_leftovers(template_id, env_hash, None)
            await asyncio.to_thread(_sweep_scratch)
            meter, note = await _disk_meter(image)
            emit(f"building {reference}")
            config = image.get("Config") or {}
            build = _Build(
                spec=spec,
                template=template,
                template_id=template_id,
                user=str(config.get("User") or ""),
                env_hash=env_hash,
                reference=reference,
                limits=limits,
                log_path=log_path,
                on_line=emit,
                on_process=on_process,
                conda_command=probe.conda,
            )
            await _podman_build(build, meter, note)
    return result(False, log_path)
