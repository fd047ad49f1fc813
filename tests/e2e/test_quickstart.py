"""The quick start (`scripts/demo.py`) driven as a person does: in a terminal, with Ctrl-C.

The demo runs on a real pseudo-terminal as the session leader and foreground process group, so
writing ^C to the master makes the line discipline send SIGINT to that whole group, as a
terminal does. The controller, the agent and the tool are the real processes on an xfs-loop
volume; nothing is mocked.

Where podman works the demo shows JupyterLab in a container: one test covers that path (its
own podman service, started and stopped by the demo; the state of an earlier version beside
it; the printed link opening JupyterLab; `--check`, as CI runs it). The local sample
(python-http, what the demo falls back to elsewhere) is what the other tests drive, with
`--runtime local`. Checked there: the first run prints the studio's URL and its page answers
through it; Ctrl-C exits 0 and leaves no process, mount or loop device of the run; a second
run brings the same studio back with a file restored byte for byte; and after a simulated
reboot (every process of a run SIGKILLed, its mounts and loop devices detached) the next run
starts the studio again from its last checkpoint. Also: Ctrl-C while the studio is still
starting, SIGTERM, a second run on the same state directory (refused while one runs, waiting
while one stops), the demo's front or runner SIGKILLed, and the terminal closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from tests import REPO_ROOT
from tests.e2e_harness import LocalhostResolver, RestClient, free_port, script
from tests.integration import require

pytestmark = [pytest.mark.e2e, pytest.mark.root]

ROOT = REPO_ROOT
DEMO = ROOT / "scripts" / "demo.py"
URL_LINE = re.compile(r"sample studio\s+(http://\S+/studios/([0-9a-f]{8})/connect)")
# A start that restores a checkpoint, on a shared two-core machine.
COME_UP_SECONDS = 300.0
SHUT_DOWN_SECONDS = 240.0


class PtyRun:
    """One run of the demo on its own pseudo-terminal, its output collected by a thread."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        pid, master = os.forkpty()
        if pid == 0:  # the child: session leader and foreground group of the new terminal
            try:
                attrs = termios.tcgetattr(0)
                attrs[3] |= termios.ISIG
                attrs[6][termios.VINTR] = b"\x03"
                termios.tcsetattr(0, termios.TCSANOW, attrs)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid = pid
        self.master = master
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._hung_up = threading.Event()
        self.returncode: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # select with a timeout, so that hang_up can stop this thread before it closes the
        # master: a read blocked on it would keep the terminal open.
        while not self._hung_up.is_set():
            try:
                ready, _, _ = select.select([self.master], [], [], 0.2)
                if not ready:
                    continue
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every holder of the terminal's slave side is gone
                return
            if not data:
                return
            with self._lock:
                self._chunks.append(data)

    @property
    def output(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode(errors="replace").replace("\r\n", "\n")

    async def foreground_group(self) -> int:
        """The terminal's foreground group, once the child has made the terminal its own."""
        deadline = time.monotonic() + 10
        while True:
            group = os.tcgetpgrp(self.master)
            if group > 0 or time.monotonic() > deadline:
                return group
            await asyncio.sleep(0.05)

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")

    def hang_up(self) -> None:
        """Close the terminal, as closing its window does: the kernel sends SIGHUP."""
        self._hung_up.set()
        self._reader.join(timeout=5)
        os.close(self.master)

    async def expect(self, pattern: re.Pattern[str] | str, limit: float) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            found = regex.search(self.output)
            if found:
                return found
            # The reader ends when no process holds the terminal any more (the runner may
            # still print after its front was killed): only then can nothing more come.
            if self.poll() is not None and not self._reader.is_alive():
                found = regex.search(self.output)
                if found:
                    return found
                raise AssertionError(
                    f"demo exited ({self.returncode}) before {regex.pattern!r}:\n{self.output}"
                )
            await asyncio.sleep(0.2)
        raise AssertionError(f"no {regex.pattern!r} after {limit:.0f} s:\n{self.output}")

    def poll(self) -> int | None:
        if self.returncode is None:
            got, status = os.waitpid(self.pid, os.WNOHANG)
            if got == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    async def wait(self, limit: float) -> int:
        deadline = time.monotonic() + limit
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"demo still running after {limit:.0f} s:\n{self.output}")
            await asyncio.sleep(0.2)
        # The runner may still hold the terminal (its front was killed): do not wait long.
        self._reader.join(timeout=5)
        assert self.returncode is not None
        return self.returncode

    def close(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        if not self._hung_up.is_set():
            self.hang_up()


# ---------------------------------------------------------------------- what a run leaves


def _start_time(pid: int) -> tuple[str, str] | None:
    """(state, start time) from /proc/PID/stat, None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], fields[19]


def processes_of(state: Path) -> dict[int, str]:
    """Live processes whose command line names the state directory: pid → start time."""
    needle = str(state).encode()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        info = _start_time(int(entry.name))
        if needle in cmdline and info is not None and info[0] != "Z":
            found[int(entry.name)] = info[1]
    return found


def still_alive(pids: dict[int, str]) -> list[int]:
    """Those of `pids` that still run (same start time, not a zombie)."""
    alive = []
    for pid, started in pids.items():
        info = _start_time(pid)
        if info is not None and info[1] == started and info[0] != "Z":
            alive.append(pid)
    return alive


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(state: Path) -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape(line.split()[4])
        if point == str(state) or point.startswith(f"{state}/"):
            points.append(point)
    return points


def loops_under(state: Path) -> list[str]:
    out = subprocess.run(
        ["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    devices = json.loads(out)["loopdevices"] if out.strip() else []
    return [d["name"] for d in devices if str(d.get("back-file") or "").startswith(f"{state}/")]


def assert_nothing_left(state: Path, pids: dict[int, str]) -> None:
    assert still_alive(pids) == [], f"processes of the run still alive: {still_alive(pids)}"
    assert processes_of(state) == {}, f"processes naming {state}: {processes_of(state)}"
    assert mounts_under(state) == [], f"mounts left under {state}: {mounts_under(state)}"
    assert loops_under(state) == [], f"loop devices left on {state}: {loops_under(state)}"


def detach_all(state: Path) -> None:
    """What a reboot does to the mounts and loop devices of the state directory."""
    for point in sorted(mounts_under(state), key=len, reverse=True):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True, check=True)
    for device in loops_under(state):
        subprocess.run(["losetup", "-d", device], capture_output=True, check=True)


def snapshot(state: Path, *extra: int) -> dict[int, str]:
    """The run's processes now (by command line, plus `extra` pids): pid → start time."""
    pids = processes_of(state)
    for pid in extra:
        info = _start_time(pid)
        assert info is not None, f"process {pid} is gone already"
        pids[pid] = info[1]
    return pids


def kill_everything(state: Path, extra: dict[int, str]) -> None:
    """SIGKILL the run's processes as a power cut would: frozen first, so none reacts."""
    pids = {**processes_of(state), **extra}
    for pid in still_alive(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    for pid in still_alive(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while still_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert still_alive(pids) == [], f"not killed: {still_alive(pids)}"


# ---------------------------------------------------------------------- the studio's side


def agent_session(state: Path, sid: str) -> dict[str, object]:
    out = subprocess.run(
        [script("studio-agent"), "sessions", "--state-dir", str(state / "agent"), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    for entry in json.loads(out.stdout)["sessions"]:
        if entry["id"] == sid:
            return dict(entry)
    raise AssertionError(f"the agent does not know session {sid}: {out.stdout}")


async def running_root(state: Path, sid: str) -> tuple[Path, int]:
    """The running session's root directory and its tool's pid, from the agent's CLI."""
    deadline = time.monotonic() + 30
    while True:
        entry = await asyncio.to_thread(agent_session, state, sid)
        if entry["status"] == "running":
            return Path(str(entry["rootDir"])), int(str(entry["pid"]))
        assert time.monotonic() < deadline, f"session {sid} not running on the agent: {entry}"
        await asyncio.sleep(0.2)


async def fetch_through_url(api: RestClient, studio_url: str, path: str = "/") -> bytes:
    """The printed studio URL as a browser follows it: redirect, token, cookie, page."""
    async with api.http.get(
        studio_url, headers={"Authorization": f"Bearer {api.token}"}, allow_redirects=False
    ) as resp:
        assert resp.status == 302, await resp.text()
        link = resp.headers["Location"]
    async with api.http.get(link) as resp:
        assert resp.status == 200, await resp.text()
    base = link.split("?", 1)[0].rstrip("/")
    async with api.http.get(f"{base}{path}") as resp:
        assert resp.status == 200, f"{path}: {resp.status}"
        return await resp.read()


# ---------------------------------------------------------------------- the tests


def require_quickstart_host() -> None:
    require(os.geteuid() == 0, "the quick start's xfs-loop volumes need root")
    require(shutil.which("mkfs.xfs") is not None, "mkfs.xfs (xfsprogs) is not installed")
    require(shutil.which("losetup") is not None, "losetup is not installed")


class Demo:
    """Runs of the demo on one state directory and one set of free ports.

    `args` join every run's command line; `env` its environment.
    """

    def __init__(self, state: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.state = state
        self.env = {**os.environ, **(env or {})}
        self.argv = [
            sys.executable,
            str(DEMO),
            "--state-dir",
            str(state),
            "--http-port",
            str(free_port()),
            "--grpc-port",
            str(free_port()),
            "--proxy-port",
            str(free_port()),
            *args,
        ]
        self.runs: list[PtyRun] = []

    def launch(self) -> PtyRun:
        run = PtyRun(self.argv, self.env)
        self.runs.append(run)
        return run

    def check(self, env: dict[str, str] | None = None) -> str:
        """A `--check` run, as CI's last step runs it: its output, once it exited 0."""
        out = subprocess.run(
            [*self.argv, "--check"],
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COME_UP_SECONDS + SHUT_DOWN_SECONDS,
            check=False,
        )
        output = out.stdout + out.stderr
        assert out.returncode == 0, output
        assert "Traceback" not in output, output
        return output

    async def come_up(self, run: PtyRun | None = None) -> tuple[PtyRun, str, str, RestClient]:
        """A run (a new one by default) up to its printed URL: (run, URL, session id, API)."""
        run = run or self.launch()
        # The premise of these tests: ^C goes to the demo's process group.
        assert await run.foreground_group() == run.pid
        found = await run.expect(URL_LINE, COME_UP_SECONDS)
        token = (self.state / "controller" / "admin-token").read_text().strip()
        base = found.group(1).split("/studios/")[0]
        return run, found.group(1), found.group(2), RestClient(base, token)

    def part(self, name: str) -> dict[int, str]:
        """The run's processes whose command line also names `name` (runner, daemons)."""
        found = {}
        for pid, started in processes_of(self.state).items():
            if name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found[pid] = started
        return found

    def cleanup(self) -> None:
        for run in self.runs:
            run.close()
        # A failed check must not leave the machine littered for the next test.
        if processes_of(self.state):
            kill_everything(self.state, {})
        detach_all(self.state)


async def until_gone(pids: dict[int, str], limit: float) -> list[int]:
    """Wait up to `limit` seconds for `pids` to end; those still alive then."""
    deadline = time.monotonic() + limit
    while True:
        alive = still_alive(pids)
        if not alive or time.monotonic() > deadline:
            return alive
        await asyncio.sleep(0.2)


async def stopped_cleanly(run: PtyRun, limit: float = SHUT_DOWN_SECONDS) -> None:
    code = await run.wait(limit)
    assert code == 0, run.output
    assert "Traceback" not in run.output, run.output
    assert re.search(r"checkpoint \S+ is finalized", run.output), run.output


async def ctrl_c(run: PtyRun, *, twice: bool = False) -> None:
    run.ctrl_c()
    if twice:
        await run.expect("stopping the sample studio", SHUT_DOWN_SECONDS)
        run.ctrl_c()
        await run.expect("still stopping", 30)
    await stopped_cleanly(run)


@pytest.mark.timeout(1500)
async def test_quickstart_ctrl_c_second_run_and_reboot(tmp_path: Path) -> None:
    require_quickstart_host()
    demo = Demo(tmp_path / "qs", "--runtime", "local")
    state = demo.state
    content = os.urandom(300_000)
    try:
        # First run: a new studio, its page through the printed URL, a file written into it.
        run, url, sid, api = await demo.come_up()
        try:
            page = await fetch_through_url(api, url)
            assert b"Directory listing" in page
            root, tool_pid = await running_root(state, sid)
            (root / "notes.bin").write_bytes(content)
            assert await fetch_through_url(api, url, "/notes.bin") == content
        finally:
            await api.close()
        pids = snapshot(state, run.pid, tool_pid)
        assert len(pids) >= 5, f"front, runner, controller, agent and tool expected: {pids}"
        await ctrl_c(run)
        assert_nothing_left(state, pids)

        # Second run: the same studio, running again, the file restored; ^C twice.
        run, url, second_sid, api = await demo.come_up()
        try:
            assert second_sid == sid
            assert "starting the sample studio, found stopped" in run.output
            _, studio = await api.request("GET", f"/studios/{sid}", expect=200)
            assert studio["statusInfo"]["status"] == "running"
            root, tool_pid = await running_root(state, sid)
            assert (root / "notes.bin").read_bytes() == content
            assert await fetch_through_url(api, url, "/notes.bin") == content
        finally:
            await api.close()
        pids = snapshot(state, run.pid, tool_pid)
        await ctrl_c(run, twice=True)
        assert_nothing_left(state, pids)

        # Third run, cut by a "power failure": every process killed, mounts and loops detached.
        run, url, third_sid, api = await demo.come_up()
        await api.close()
        assert third_sid == sid
        _, tool_pid = await running_root(state, sid)
        victims = snapshot(state, run.pid, tool_pid)
        await asyncio.to_thread(kill_everything, state, victims)
        assert run.poll() == -signal.SIGKILL
        detach_all(state)
        assert_nothing_left(state, victims)

        # After the "reboot": the studio, whose tool died while nothing ran, starts again
        # from its last checkpoint.
        run, url, fourth_sid, api = await demo.come_up()
        try:
            assert fourth_sid == sid
            assert re.search(r"starting the sample studio, found (errored|stopped)", run.output)
            _, studio = await api.request("GET", f"/studios/{sid}", expect=200)
            assert studio["statusInfo"]["status"] == "running"
            root, _ = await running_root(state, sid)
            assert (root / "notes.bin").read_bytes() == content
            assert await fetch_through_url(api, url, "/notes.bin") == content
        finally:
            await api.close()
        pids = snapshot(state, run.pid)
        await ctrl_c(run)
        assert_nothing_left(state, pids)
    finally:
        demo.cleanup()


@pytest.mark.timeout(1500)
async def test_quickstart_interrupted_start_sigterm_lock_and_killed_parts(tmp_path: Path) -> None:
    """Ctrl-C while the studio starts, SIGTERM, a second run on the same state directory, and
    the demo's own two processes SIGKILLed in turn."""
    require_quickstart_host()
    demo = Demo(tmp_path / "qs", "--runtime", "local")
    state = demo.state
    try:
        # Ctrl-C before the studio runs: it is stopped as soon as it runs (the API refuses a
        # stop while starting), with its final checkpoint.
        run = demo.launch()
        assert await run.foreground_group() == run.pid
        await run.expect(r"is starting; waiting|sample studio\s+http", COME_UP_SECONDS)
        pids = snapshot(state, run.pid)
        await ctrl_c(run)
        assert_nothing_left(state, pids)

        # SIGTERM to the demo (as `kill PID` does) is an orderly stop as well; meanwhile a
        # second run on the same state directory is refused, naming the first.
        run, _, sid, api = await demo.come_up()
        await api.close()
        other = demo.launch()
        assert await other.wait(60) == 1, other.output
        assert "another quick start" in other.output, other.output
        assert "Traceback" not in other.output, other.output
        pids = snapshot(state, run.pid)
        os.kill(run.pid, signal.SIGTERM)
        await stopped_cleanly(run)
        assert_nothing_left(state, pids)

        # The front SIGKILLed (a shell's `kill -9`): the runner sees the pipe from the front
        # close and does the same orderly stop on its own. A run started meanwhile waits for
        # it, then comes up; the agent is held with SIGSTOP so that "meanwhile" is sure.
        run, _, _, api = await demo.come_up()
        await api.close()
        _, tool_pid = await running_root(state, sid)
        pids = snapshot(state, run.pid, tool_pid)
        agent_pid = next(iter(demo.part("studio-agent")))
        os.kill(agent_pid, signal.SIGSTOP)
        try:
            os.kill(run.pid, signal.SIGKILL)
            await run.expect("front process exited: stopping", 30)
            waiting = demo.launch()
            await waiting.expect("waiting for the previous run", 60)
        finally:
            os.kill(agent_pid, signal.SIGCONT)
        assert run.poll() == -signal.SIGKILL
        _, _, _, api = await demo.come_up(waiting)
        await api.close()
        assert still_alive(pids) == []
        assert re.search(r"checkpoint \S+ is finalized", run.output), run.output

        # The runner SIGKILLed: the controller and the agent end with it (parent-death
        # signal); the agent leaves the tool running by design, and the next run re-adopts it.
        run = waiting
        _, tool_pid = await running_root(state, sid)
        runner = demo.part("--runner-fd")
        daemons = {**demo.part("studio-controller"), **demo.part("studio-agent")}
        assert len(runner) == 1 and len(daemons) == 2, (runner, daemons)
        os.kill(next(iter(runner)), signal.SIGKILL)
        assert await run.wait(30) == 1
        assert "runner was killed by signal 9" in run.output, run.output
        assert await until_gone(daemons, 60) == [], (
            "the controller or the agent outlived the runner"
        )

        run, _, third_sid, api = await demo.come_up()
        await api.close()
        assert third_sid == sid
        _, adopted_pid = await running_root(state, sid)
        assert adopted_pid == tool_pid, "the tool left running was not re-adopted"

        # The terminal closed: the same orderly stop, with nowhere left to print.
        pids = snapshot(state, run.pid, tool_pid)
        run.hang_up()
        assert await run.wait(SHUT_DOWN_SECONDS) == 0
        assert_nothing_left(state, pids)
        with contextlib.closing(sqlite3.connect(state / "controller" / "studios.db")) as db:
            status, generation = db.execute(
                "SELECT status, generation FROM studios WHERE session_id = ?", (sid,)
            ).fetchone()
            newest = db.execute(
                "SELECT status, generation FROM checkpoints WHERE session_id = ?"
                " ORDER BY id DESC LIMIT 1",
                (sid,),
            ).fetchone()
        assert status == "stopped"
        assert newest == ("finalized", generation)
    finally:
        demo.cleanup()


# ---------------------------------------------------------------------- JupyterLab on podman

JUPYTER_IMAGE = "localhost/studios/jupyterlab:4.6-0.1"
BROWSER_LINK = re.compile(r"Open in a browser now[^\n]*\n\s+(http://\S+)")


def _podman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=False)


def require_podman_host() -> None:
    require(shutil.which("podman") is not None, "podman is not installed (scripts/install)")
    require(
        _podman("image", "exists", JUPYTER_IMAGE).returncode == 0,
        f"{JUPYTER_IMAGE} is not built (studio-agent images build jupyterlab; "
        "scripts/podman-setup start)",
    )


def podman_setup(socket: Path, command: str) -> int:
    return subprocess.run(
        [str(ROOT / "scripts" / "podman-setup"), command],
        env={**os.environ, "STUDIOS_PODMAN_SOCKET": str(socket)},
        capture_output=True,
        timeout=60,
        check=False,
    ).returncode


def remove_containers_of(agent_dir: Path) -> None:
    """What a failed run's agent left in podman (only its own, by its id's label)."""
    from agent.runtime.podman import LABEL_OWNER

    with contextlib.suppress(FileNotFoundError):
        owner = (agent_dir / "agent-id").read_text().strip()
        for cid in _podman("ps", "-aq", "--filter", f"label={LABEL_OWNER}={owner}").stdout.split():
            _podman("rm", "-f", "-t", "0", cid)


async def open_jupyterlab(link: str) -> tuple[str, dict[str, object]]:
    """The printed browser link as a browser opens it: JupyterLab's page, then its
    /api/status with the connect cookie the link set."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=LocalhostResolver()),
        cookie_jar=aiohttp.CookieJar(unsafe=True),
    ) as http:
        async with http.get(link) as resp:
            assert resp.status == 200, await resp.text()
            # token -> cookie -> clean URL -> Jupyter's own redirect to /lab
            assert resp.url.path.startswith("/lab"), resp.url
            page = await resp.text()
            base = f"{resp.url.scheme}://{resp.url.host}:{resp.url.port}"
        async with http.get(f"{base}/api/status") as resp:
            assert resp.status == 200, await resp.text()
            return page, dict(await resp.json())


@pytest.mark.podman
@pytest.mark.timeout(1200)
async def test_quickstart_shows_jupyterlab_on_podman_beside_the_old_sample(tmp_path: Path) -> None:
    require_quickstart_host()
    require_podman_host()
    # A socket of its own, not answering yet: the demo must start podman's service itself
    # (and stop it again), whatever the host's service does meanwhile.
    socket = tmp_path / "podman" / "podman.sock"
    demo = Demo(tmp_path / "qs", env={"STUDIOS_PODMAN_SOCKET": str(socket)})
    state = demo.state
    try:
        # An earlier version's state (the python-http `sample`), made by a run that falls
        # back because podman's service cannot start: its socket's directory cannot be made.
        out = await asyncio.to_thread(
            demo.check, {"STUDIOS_PODMAN_SOCKET": "/dev/null/podman.sock"}
        )
        assert re.search(
            r"sample studio: Python's http.server \(studios/python-http:3.11-0.1\) on the local "
            r"runtime, not JupyterLab: podman's service could not be started .*; for JupyterLab",
            out,
        ), out
        assert "check: the sample studio's page answers through the proxy" in out, out

        # Podman works: JupyterLab in a container, a studio of its own beside `sample`.
        run, _, sid, api = await demo.come_up()
        try:
            assert "starting it" in run.output and "sample studio: JupyterLab 4.6" in run.output
            assert (
                "jupyterlab: JupyterLab 4.6 (studios/jupyterlab:4.6-0.1) in a podman container"
                in run.output
            )
            link = BROWSER_LINK.search(run.output)
            assert link is not None, run.output
            page, status = await open_jupyterlab(link.group(1))
            assert "JupyterLab" in page and "started" in status, (page[:300], status)
            _, listing = await api.request("GET", "/studios?search=sample", expect=200)
            old = {s["name"]: s for s in listing["studios"]}["sample"]
            assert old["statusInfo"]["status"] == "stopped", old["statusInfo"]
            assert old["template"]["repository"] == "studios/python-http:3.11-0.1"
        finally:
            await api.close()
        service = {
            pid: started
            for pid, started in processes_of(socket.parent).items()
            if b"system\0service" in Path(f"/proc/{pid}/cmdline").read_bytes()
        }
        assert len(service) == 1, f"the demo's podman service expected: {service}"
        pids = {**snapshot(state, run.pid), **service}
        await ctrl_c(run)
        assert "stopping podman's service (this run started it)" in run.output, run.output
        assert_nothing_left(state, pids)
        assert podman_setup(socket, "status") != 0, "podman's service still answers"
        label = "label=studios.session-id=" + sid
        assert _podman("ps", "-aq", "--filter", label).stdout.strip() == ""

        # CI's last step: the same studio comes back and answers through the proxy.
        out = await asyncio.to_thread(demo.check)
        assert f"/studios/{sid}/connect" in out and "found stopped" in out, out
        assert "check: the sample studio's page and /api/status answer through the proxy" in out
        assert podman_setup(socket, "status") != 0, "podman's service still answers"
    finally:
        # Containers first: their overlays hold the volume mounts the clean-up detaches.
        remove_containers_of(state / "agent-podman")
        demo.cleanup()
        podman_setup(socket, "stop")
