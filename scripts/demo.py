"""The quick start's main job: a controller, an agent and a sample studio on embedded defaults.

Starts `studio-controller serve` and `studio-agent serve` as child processes with their state
in `.quickstart/` (or `--state-dir`), creates a compute environment and the sample studio (or
reuses them on a later run, starting the studio again whatever state an earlier run or a
reboot left it in), waits until its page answers through the proxy and prints where to open
it. Ctrl-C stops the studio (its final checkpoint is written), then the agent and the
controller, and exits 0.

    scripts/quickstart            # install, then this
    .venv/bin/python scripts/demo.py --check   # start, verify the page, stop, exit (CI)

Which sample (`--runtime auto`, the default). Where podman works, the sample is JupyterLab
(template `studios/jupyterlab:4.6-0.1`) in a podman container: running as root, `podman`
installed, its REST service answering on `$STUDIOS_PODMAN_SOCKET` (default
/run/podman/podman.sock; started here with `scripts/podman-setup start` when nothing answers)
and the image `localhost/studios/jupyterlab:4.6-0.1` present (built here with `studio-agent
images build jupyterlab` when missing: minutes on a clean machine, with the build's progress
on the terminal; an image that exists is never rebuilt, even when its definition changed).
Elsewhere the sample is Python's http.server (`studios/python-http:3.11-0.1`) on the local
runtime, as before, and one line says why and how to get JupyterLab. The output always says
which it chose. `--runtime podman` makes any of these a failure instead (CI's check);
`--runtime local` always takes the local sample. A podman service this run started is stopped
when it ends (a run killed outright leaves it, and the next run finds it answering); one that
was already answering is left alone. CI's last step (`.ci/run`: `--check --runtime podman`)
comes after `scripts/test`, which stops the service it started, so this start is what it
relies on.

The two samples live side by side in one state directory, each with a compute environment,
an agent state directory and a studio of its own: `sample` (python-http, compute environment
`quickstart`, `agent/`, `work/`: what earlier versions created) and `jupyterlab` (compute
environment `quickstart-podman`, `agent-podman/`, `work-podman/`). An existing `sample` is
therefore neither reused for JupyterLab nor replaced: a studio's template is fixed at
creation and python-http has no container image, so reusing it could not run on podman, and
replacing it would delete the files its checkpoint keeps. It stays stopped while the podman
sample runs and comes back, with its files, on any later run that falls back (or with
`--runtime local`). An agent runs one runtime, and a compute environment's studios may be
placed on any of its agents: hence an agent and a compute environment per sample, so the
controller never places python-http on the podman agent.

Processes. A terminal sends Ctrl-C's SIGINT to its whole foreground process group, so this
script is two processes: the front (what the shell started, in the terminal's group) and the
runner, in a session of its own, which starts the controller and the agent (each in a session
of its own as well) and does the orderly shutdown. The front only turns SIGINT, SIGTERM and
SIGHUP into a SIGTERM for the runner and returns the runner's exit status.

- Ctrl-C or SIGTERM: stop the studio and wait for its final checkpoint, then SIGTERM the agent,
  then the controller; exit 0 (1 if the studio could not be stopped cleanly, saying why).
- A second Ctrl-C while stopping only prints that the stop is under way: breaking off there
  would leave the tool running and its volume mounted, so it is not offered.
- The front killed (SIGKILL, or the terminal closed): the runner holds the read end of a pipe
  whose only writer is the front; its EOF starts the same orderly shutdown.
- The runner killed: the controller and the agent were started with PR_SET_PDEATHSIG=SIGTERM
  and exit cleanly. The agent leaves the tool running by design (an agent restart must not
  stop studios): the next run's agent re-adopts it, or the studio is started again.
- A lock (`<state>/run.lock`, flock) keeps two runs off one state directory; a run waits for
  one that is still stopping.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from tests.e2e_harness import AgentProcess, ControllerProcess, RestClient, script  # noqa: E402

DEFAULT_STATE = ROOT / ".quickstart"
PODMAN_SETUP = ROOT / "scripts" / "podman-setup"
JUPYTER_IMAGE = "localhost/studios/jupyterlab:4.6-0.1"
# The tool's own start inside the container, on a shared and busy host.
PODMAN_TOOL_START_SECONDS = 180
# A restore and the tool's start; generous because the machine may be shared and slow.
START_TIMEOUT = 240.0
# The agent's grace period for the tool (30 s) plus writing the final checkpoint.
STOP_TIMEOUT = 180.0
PROCESS_STOP_TIMEOUT = 30.0
POLL = 0.3
_PR_SET_PDEATHSIG = 1


class DemoError(Exception):
    """A failure the user is told about in one sentence (no traceback)."""


@dataclass(frozen=True)
class Sample:
    """One kind of sample studio and where its pieces live (see the module's docstring)."""

    runtime: str
    template: str
    studio_name: str
    compute_env: str
    agent_dir: str
    work_dir: str
    what: str
    # Text its landing page contains, and a path of its API that must answer 200 (--check).
    page_marker: str
    api_path: str | None


LOCAL = Sample(
    runtime="local",
    template="studios/python-http:3.11-0.1",
    studio_name="sample",
    compute_env="quickstart",
    agent_dir="agent",
    work_dir="work",
    what="Python's http.server (studios/python-http:3.11-0.1) on the local runtime",
    page_marker="Directory listing",
    api_path=None,
)
PODMAN = Sample(
    runtime="podman",
    template="studios/jupyterlab:4.6-0.1",
    studio_name="jupyterlab",
    compute_env="quickstart-podman",
    agent_dir="agent-podman",
    work_dir="work-podman",
    what="JupyterLab 4.6 (studios/jupyterlab:4.6-0.1) in a podman container",
    page_marker="JupyterLab",
    api_path="/api/status",
)
HOW_TO_JUPYTERLAB = (
    "for JupyterLab in a container, run scripts/quickstart as root on a host where podman "
    "works (scripts/install installs it)"
)


def podman_socket() -> Path:
    # The same variable scripts/podman-setup reads, so both name one socket.
    return Path(os.environ.get("STUDIOS_PODMAN_SOCKET", "/run/podman/podman.sock"))


def say(text: str, *, err: bool = False) -> None:
    # After a hang-up the terminal is gone and writes fail with EIO; the run must go on
    # and shut down properly all the same.
    stream = sys.stderr if err else sys.stdout
    with contextlib.suppress(OSError, ValueError):
        print(text, file=stream, flush=True)


# ------------------------------------------------------------------ child processes


def _parent_death_signal() -> Callable[[], None]:
    """A pre-exec hook that asks the kernel to SIGTERM the child when the runner dies.

    The libc function is looked up here, before any fork: only the call itself runs in the
    child, between fork and exec, where loading a library could deadlock.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # The runner may have died before the request was made: then nobody will send it.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def _launch(proc: ControllerProcess | AgentProcess) -> None:
    """Like the harness's start, but in a session of its own, and ended with the runner.

    Its own session keeps the terminal's SIGINT (and SIGHUP) away, so that the runner can
    stop the studio through both daemons before it stops them.
    """
    proc.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(proc.log_path, "ab") as log:
        proc.proc = subprocess.Popen(
            proc.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **proc.env},
            start_new_session=True,
            preexec_fn=_parent_death_signal(),
        )


class QuickController(ControllerProcess):
    def start(self) -> None:
        _launch(self)


class QuickAgent(AgentProcess):
    def start(self) -> None:
        _launch(self)


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


# ------------------------------------------------------------------ the run lock


class RunLock:
    """One run per state directory; the file says which process holds it and in what phase."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def try_acquire(self) -> dict[str, Any] | None:
        """None when acquired, else what the holder wrote (pid, phase)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = json.loads(self.path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            return holder if isinstance(holder, dict) else {}
        self.fd = fd
        self.set_phase("starting")
        return None

    def set_phase(self, phase: str) -> None:
        if self.fd is None:
            return
        data = json.dumps({"pid": os.getpid(), "phase": phase}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


async def acquire_lock(lock: RunLock, quit_event: asyncio.Event) -> bool:
    """Take the lock, waiting for a run that is still stopping; False if told to quit first."""
    told = False
    while True:
        holder = lock.try_acquire()
        if holder is None:
            return True
        if holder.get("phase") != "stopping":
            raise DemoError(
                f"another quick start (pid {holder.get('pid', '?')}) is running with its state "
                f"in {lock.path.parent}: stop it first (Ctrl-C in its terminal), or give this "
                "one another --state-dir"
            )
        if not told:
            say(f"waiting for the previous run (pid {holder.get('pid', '?')}) to finish stopping")
            told = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(quit_event.wait(), timeout=0.5)
        if quit_event.is_set():
            return False


# ------------------------------------------------------------------ preparing podman


class Unusable(Exception):
    """Why the podman sample cannot run here, in words for the user."""


async def run_step(
    argv: list[str], env: dict[str, str] | None = None, *, quiet: bool = False
) -> int:
    """Run one preparation step, its output on the terminal (a build shows its progress
    there); its exit status.

    In a process group of its own, so that a Ctrl-C meanwhile (which cancels this) ends the
    whole step, the image build's podman processes included, before the run stops.
    """
    sink = subprocess.DEVNULL if quiet else None
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=sink,
        stderr=sink,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        return await proc.wait()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), PROCESS_STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        raise


class Podman:
    """Podman's service and the JupyterLab image, made ready where they can be."""

    def __init__(self) -> None:
        self.socket = podman_socket()
        self.env = {"STUDIOS_PODMAN_SOCKET": str(self.socket)}
        # Set before the start is tried: a start cut short may still have left it running.
        self.started_service = False

    async def prepare(self) -> None:
        """Raises Unusable naming the first thing missing."""
        if os.geteuid() != 0:
            raise Unusable("not running as root (the podman runtime's session volumes need root)")
        if shutil.which("podman") is None:
            raise Unusable("podman is not installed")
        if await run_step([str(PODMAN_SETUP), "status"], self.env, quiet=True) != 0:
            say(f"==> podman's service does not answer on {self.socket}: starting it")
            self.started_service = True
            # Only what the sample needs: the other studio images are the tests' concern.
            code = await run_step(
                [str(PODMAN_SETUP), "start"], {**self.env, "STUDIOS_SKIP_STUDIO_IMAGES": "1"}
            )
            if code != 0:
                raise Unusable(
                    f"podman's service could not be started (scripts/podman-setup start exited "
                    f"{code}, see above)"
                )
        if await run_step(["podman", "image", "exists", JUPYTER_IMAGE], quiet=True) != 0:
            say(
                f"==> {JUPYTER_IMAGE} is not built: building it (studio-agent images build "
                "jupyterlab; Debian base and JupyterLab from PyPI, several minutes the first time)"
            )
            started = time.monotonic()
            code = await run_step([script("studio-agent"), "images", "build", "jupyterlab"])
            if code != 0:
                raise Unusable(
                    "the JupyterLab image could not be built (studio-agent images build "
                    f"jupyterlab exited {code}, see above)"
                )
            say(f"==> {JUPYTER_IMAGE} built in {time.monotonic() - started:.0f} s")

    async def stop_service(self, *, quiet: bool = False) -> None:
        """Stop the service if this run started it; one that was answering is not ours."""
        if not self.started_service:
            return
        if not quiet:
            say("stopping podman's service (this run started it)")
        code = await run_step([str(PODMAN_SETUP), "stop"], self.env, quiet=True)
        if code != 0:
            say(f"podman's service could not be stopped (scripts/podman-setup stop exited {code})")
        self.started_service = False

    def agent_args(self) -> list[str]:
        return [
            "--podman-socket",
            str(self.socket),
            "--start-timeout-seconds",
            str(PODMAN_TOOL_START_SECONDS),
        ]


async def choose_sample(wanted: str, podman: Podman) -> Sample:
    """The sample this run shows, said in one line; `wanted` is --runtime."""
    if wanted == "local":
        say(f"sample studio: {LOCAL.what} (--runtime local)")
        return LOCAL
    try:
        await podman.prepare()
    except Unusable as exc:
        if wanted == "podman":
            raise DemoError(f"--runtime podman: {exc}") from None
        # A start that failed half-way may have left it running; the local sample needs none.
        await podman.stop_service(quiet=True)
        say(f"sample studio: {LOCAL.what}, not JupyterLab: {exc}; {HOW_TO_JUPYTERLAB}")
        return LOCAL
    say(f"sample studio: {PODMAN.what}")
    return PODMAN


# ------------------------------------------------------------------ the stack


class QuitRequest:
    """The first request starts the shutdown; later ones only say that it is under way."""

    def __init__(self, lock: RunLock) -> None:
        self.event = asyncio.Event()
        self.lock = lock

    def __call__(self, why: str) -> None:
        # At once, so that a run started right after this one was interrupted waits for it
        # instead of being refused.
        self.lock.set_phase("stopping")
        if self.event.is_set():
            say(
                "\nstill stopping: the sample studio's final checkpoint is being written; "
                "this run ends by itself when it is done"
            )
            return
        say(f"\n{why}: stopping")
        self.event.set()


class Stack:
    def __init__(self, opts: argparse.Namespace, lock: RunLock) -> None:
        self.state: Path = opts.state_dir
        self.lock = lock
        self.controller = QuickController(
            self.state / "controller",
            http_port=opts.http_port,
            grpc_port=opts.grpc_port,
            grpc_agents_port=opts.grpc_agents_port,
        )
        self.proxy_port: int = opts.proxy_port
        self.wanted_runtime: str = opts.runtime
        self.podman = Podman()
        self.sample = LOCAL
        self.agent: QuickAgent | None = None
        self.api: RestClient | None = None
        self.sid: str | None = None

    # -------------------------------------------------------------- health

    def check_children(self) -> None:
        if self.controller.proc is not None and not self.controller.alive():
            raise DemoError(
                f"the controller exited ({_last_line(self.controller.log_path)}); "
                f"its log: {self.controller.log_path}"
            )
        if self.agent is not None and not self.agent.alive():
            raise DemoError(
                f"the agent exited ({_last_line(self.agent.log_path)}); "
                f"its log: {self.agent.log_path}"
            )

    async def studio(self, sid: str) -> dict[str, Any]:
        assert self.api is not None
        _, body = await self.api.request("GET", f"/studios/{sid}", expect=200)
        return dict(body)

    async def wait_for(self, sid: str, wanted: set[str], limit: float) -> dict[str, Any]:
        deadline = time.monotonic() + limit
        while True:
            self.check_children()
            studio = await self.studio(sid)
            info = studio["statusInfo"]
            if info["status"] in wanted:
                return studio
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the sample studio is still {info['status']} after {limit:.0f} s"
                    f" ({info.get('message') or 'no message'})"
                )
            await asyncio.sleep(POLL)

    # -------------------------------------------------------------- bring-up

    async def bring_up(self, check: bool) -> None:
        self.sample = await choose_sample(self.wanted_runtime, self.podman)
        self.controller.start()
        try:
            await self.controller.wait_ready(timeout=90)
        except (RuntimeError, TimeoutError):
            raise DemoError(
                f"the controller did not start ({_last_line(self.controller.log_path)}); "
                f"its log: {self.controller.log_path}"
            ) from None
        # Unchecked: the demo runs without the test dependencies (tests.api_contract).
        self.api = RestClient(self.controller.url, self.controller.admin_token, check=False)
        compute_env_id = await self.ensure_compute_env()
        self.agent = QuickAgent(
            self.controller,
            compute_env_id,
            self.state / self.sample.agent_dir,
            proxy_port=self.proxy_port,
            runtime=self.sample.runtime,
            extra_args=self.podman.agent_args() if self.sample is PODMAN else (),
        )
        self.agent.start()
        self.sid = await self.ensure_sample_studio(compute_env_id)
        studio = await self.until_page_answers(self.sid)
        self.lock.set_phase("running")
        browser_link = await self.connect_link(studio)
        token_file = self.controller.data_dir / "admin-token"
        agent_dir = self.agent.state_dir
        say(
            f"""
Studios is running.
  controller API   {self.controller.url}   (token: {token_file})
  agent            {agent_dir}   (studio-agent sessions --state-dir {agent_dir})
  sample studio    {studio["studioUrl"]}
                   {self.sample.studio_name}: {self.sample.what}

Open in a browser now (single use, valid 60 s):
  {browser_link}
A fresh link at any time: open the sample studio's URL above in the browser and sign in
with the token in {token_file}, or
  curl -s -o /dev/null -w '%{{redirect_url}}\\n' -H "Authorization: Bearer $(cat {token_file})" \\
    {studio["studioUrl"]}

Ctrl-C stops the studio (its checkpoint is kept), the agent and the controller."""
        )
        if check:
            await self.check_sample(browser_link)

    async def check_sample(self, link: str) -> None:
        """The landing page (and the tool's API) through the proxy, as the signed-in user."""
        status, page, url = await self.fetch_page(link)
        if status != 200 or self.sample.page_marker not in page:
            raise DemoError(
                f"the sample studio's page answered {status} through the proxy, without "
                f"{self.sample.page_marker!r}"
            )
        checked = "page answers"
        if self.sample.api_path is not None:
            # The connect cookie the link set, on the studio's own host.
            base = url.split("?", 1)[0].split("/", 3)[:3]
            status, body, _ = await self.fetch_page("/".join(base) + self.sample.api_path)
            if status != 200 or '"started"' not in body:
                raise DemoError(
                    f"{self.sample.api_path} answered {status} through the proxy: {body[:200]}"
                )
            checked = f"page and {self.sample.api_path} answer"
        say(f"check: the sample studio's {checked} through the proxy")

    async def ensure_compute_env(self) -> str:
        assert self.api is not None
        _, body = await self.api.request("GET", "/compute-envs", expect=200)
        for env in body["computeEnvs"]:
            if env["name"] == self.sample.compute_env:
                return str(env["id"])
        return await self.api.create_compute_env(
            self.sample.compute_env, self.state / self.sample.work_dir
        )

    async def find_sample(self) -> str | None:
        assert self.api is not None
        name = self.sample.studio_name
        _, body = await self.api.request("GET", f"/studios?search={name}", expect=200)
        for studio in body["studios"]:
            if studio["name"] == name:
                return str(studio["sessionId"])
        return None

    async def ensure_sample_studio(self, compute_env_id: str) -> str:
        assert self.api is not None
        sid = await self.find_sample()
        if sid is not None:
            return sid
        say(f"creating the sample studio {self.sample.studio_name!r}")
        _, body = await self.api.request(
            "POST",
            "/studios",
            {
                "name": self.sample.studio_name,
                "computeEnvId": compute_env_id,
                "dataStudioToolUrl": self.sample.template,
            },
            expect=200,
        )
        return str(body["studio"]["sessionId"])

    async def until_page_answers(self, sid: str) -> dict[str, Any]:
        """Start the studio as often as needed (once per run) until its page answers.

        The controller's word alone is not enough: after a reboot its database still says
        `running` until the agent has reported, so the page must answer through the proxy.
        """
        assert self.api is not None
        started = False
        said = ""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self.check_children()
            studio = await self.studio(sid)
            status = studio["statusInfo"]["status"]
            message = studio["statusInfo"].get("message") or ""
            if status in ("stopped", "errored", "buildFailed"):
                if started:
                    raise DemoError(f"the sample studio failed to start: {message or status}")
                # The agent's message may carry the tool's last output: its first line says why.
                first = message.splitlines()[0] if message else ""
                note = f" ({first})" if status == "errored" and first else ""
                say(f"starting the sample studio, found {status}{note}")
                code, body = await self.api.request("PUT", f"/studios/{sid}/start", {})
                if code == 200:
                    started = True
                elif code != 409:  # 409: its status changed meanwhile; look again
                    raise DemoError(f"the start was refused: {_message(body)}")
            elif status == "running":
                link = await self.connect_link(studio)
                code, _, _ = await self.fetch_page(link)
                if code == 200:
                    return studio
            elif status != said:
                say(f"the sample studio is {status}; waiting")
            said = status
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the sample studio did not come up in {START_TIMEOUT:.0f} s: it is "
                    f"{status} ({message or 'no message'}); the agent's log: "
                    f"{self.agent.log_path if self.agent else self.state}"
                )
            await asyncio.sleep(POLL)

    async def connect_link(self, studio: dict[str, Any]) -> str:
        """A fresh single-use browser link (the studio URL's redirect)."""
        assert self.api is not None
        async with self.api.http.get(
            studio["studioUrl"],
            headers={"Authorization": f"Bearer {self.api.token}"},
            allow_redirects=False,
        ) as resp:
            return resp.headers.get("Location", "")

    async def fetch_page(self, link: str) -> tuple[int, str, str]:
        """(status, text, the URL it ended at after the redirects)"""
        assert self.api is not None
        if not link:
            return 0, "", ""
        try:
            async with self.api.http.get(link) as resp:
                return resp.status, await resp.text(errors="replace"), str(resp.url)
        except aiohttp.ClientError as exc:
            return 0, str(exc), link

    # -------------------------------------------------------------- running

    async def watch(self, quit_event: asyncio.Event) -> None:
        """Until told to quit; a daemon that dies meanwhile ends the run."""
        while not quit_event.is_set():
            self.check_children()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(quit_event.wait(), timeout=1.0)

    # -------------------------------------------------------------- shutdown

    async def shutdown(self) -> int:
        code = 0
        if self.api is not None and self.agent is not None:
            try:
                code = await self.stop_studio()
            except (DemoError, aiohttp.ClientError, TimeoutError, AssertionError) as exc:
                say(f"the sample studio could not be stopped: {_describe(exc)}", err=True)
                code = 1
        if self.api is not None:
            await self.api.close()
        if self.agent is not None and self.agent.proc is not None:
            say("stopping the agent")
            await asyncio.to_thread(self.agent.stop, signal.SIGTERM, PROCESS_STOP_TIMEOUT)
        if self.controller.proc is not None:
            say("stopping the controller")
            await asyncio.to_thread(self.controller.stop, signal.SIGTERM, PROCESS_STOP_TIMEOUT)
        await self.podman.stop_service()
        return code

    async def stop_studio(self) -> int:
        assert self.api is not None
        self.check_children()
        sid = self.sid or await self.find_sample()
        if sid is None:
            return 0
        studio = await self.studio(sid)
        status = studio["statusInfo"]["status"]
        if status in ("starting", "building"):
            # The API refuses a stop before the tool runs.
            say("the sample studio is still starting; it is stopped as soon as it runs")
            studio = await self.wait_for(
                sid, {"running", "errored", "stopped", "buildFailed"}, START_TIMEOUT
            )
            status = studio["statusInfo"]["status"]
        if status == "running":
            say("stopping the sample studio (writing its final checkpoint) ...")
            code, body = await self.api.request("PUT", f"/studios/{sid}/stop")
            if code not in (200, 409):
                raise DemoError(f"the stop was refused: {_message(body)}")
            status = "stopping"
        if status == "stopping":
            studio = await self.wait_for(sid, {"stopped", "errored"}, STOP_TIMEOUT)
            status = studio["statusInfo"]["status"]
            if status == "stopped":
                say(f"the sample studio is stopped; {await self.checkpoint_note(sid)}")
                return 0
        if status == "errored":
            message = studio["statusInfo"].get("message") or "no message"
            say(f"the sample studio is errored: {message}", err=True)
            return 1
        return 0

    async def checkpoint_note(self, sid: str) -> str:
        assert self.api is not None
        code, body = await self.api.request("GET", f"/studios/{sid}/checkpoints?max=100")
        checkpoints = body.get("checkpoints", []) if code == 200 and isinstance(body, dict) else []
        if not checkpoints:
            return "no checkpoint is listed"
        newest = max(checkpoints, key=lambda c: int(c["id"]))
        return f"its checkpoint {newest['name']} is {newest['status']}"


def _message(body: Any) -> str:
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])
    return str(body)[:200]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DemoError):
        return str(exc)
    if isinstance(exc, aiohttp.ClientError):
        return f"the controller did not answer ({exc})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------ the runner


async def runner_main(opts: argparse.Namespace, front_fd: int | None) -> int:
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    loop = asyncio.get_running_loop()
    lock = RunLock(opts.state_dir / "run.lock")
    quit_request = QuitRequest(lock)
    for sig, why in (
        (signal.SIGINT, "interrupted"),
        (signal.SIGTERM, "interrupted"),
        (signal.SIGHUP, "the terminal hung up"),
    ):
        loop.add_signal_handler(sig, quit_request, why)
    if front_fd is not None:

        def front_gone() -> None:
            # Readable means EOF: the front never writes.
            loop.remove_reader(front_fd)
            quit_request("the quick start's front process exited")

        loop.add_reader(front_fd, front_gone)

    try:
        if not await acquire_lock(lock, quit_request.event):
            return 0
        stack = Stack(opts, lock)
        code = 0
        bring_up = asyncio.create_task(stack.bring_up(opts.check))
        quit_wait = asyncio.create_task(quit_request.event.wait())
        await asyncio.wait({bring_up, quit_wait}, return_when=asyncio.FIRST_COMPLETED)
        if bring_up.done():
            error = bring_up.exception()
            if error is not None:
                code = _report(error, opts.state_dir)
            elif not opts.check:
                try:
                    await stack.watch(quit_request.event)
                except DemoError as exc:
                    code = _report(exc, opts.state_dir)
        else:
            bring_up.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await bring_up
        quit_wait.cancel()
        quit_request.event.set()
        lock.set_phase("stopping")
        return max(code, await stack.shutdown())
    except DemoError as exc:
        return _report(exc, opts.state_dir)
    finally:
        lock.release()


def _report(exc: BaseException, state: Path) -> int:
    """One line for the user; the traceback of anything unexpected goes to a log file."""
    if isinstance(exc, DemoError):
        say(f"quick start: {exc}", err=True)
        return 1
    log = state / "quickstart.log"
    with contextlib.suppress(OSError), open(log, "a") as f:
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.write("".join(traceback.format_exception(exc)))
    say(f"quick start failed: {_describe(exc)} (details in {log})", err=True)
    return 1


# ------------------------------------------------------------------ the front


def front_main(argv: list[str]) -> int:
    """Start the runner in its own session and relay the terminal's signals to it."""
    read_end, write_end = os.pipe()
    runner: subprocess.Popen[bytes] | None = None
    pending = False

    def relay(signum: int, _frame: object) -> None:
        nonlocal pending
        if runner is None:
            pending = True
            return
        with contextlib.suppress(ProcessLookupError):
            runner.send_signal(signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, relay)
    runner = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *argv, "--runner-fd", str(read_end)],
        stdin=subprocess.DEVNULL,
        pass_fds=(read_end,),
        start_new_session=True,
    )
    os.close(read_end)
    if pending:
        runner.send_signal(signal.SIGTERM)
    code = runner.wait()
    os.close(write_end)
    if code < 0:
        say(f"quick start: its runner was killed by signal {-code}", err=True)
        return 1
    return code


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="start, verify, stop and exit")
    parser.add_argument(
        "--state-dir",
        type=lambda s: Path(s).resolve(),
        default=DEFAULT_STATE,
        help=f"where the controller, the agent and the studio keep their state ({DEFAULT_STATE})",
    )
    parser.add_argument("--http-port", type=int, default=8080, help="the controller's REST API")
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=8081,
        help="the controller's enrollment endpoint (gRPC, TLS), what the agent is given",
    )
    parser.add_argument(
        "--grpc-agents-port",
        type=int,
        default=None,
        help="the controller's agent endpoint (gRPC, mutual TLS; default: a free port)",
    )
    parser.add_argument("--proxy-port", type=int, default=7070, help="the agent's connect proxy")
    parser.add_argument(
        "--runtime",
        choices=("auto", "podman", "local"),
        default="auto",
        help="the sample: JupyterLab on podman where podman works, else python-http on the "
        "local runtime (auto); podman (fail where it does not work); local",
    )
    # Internal: set by the front for the runner (the read end of the pipe it watches).
    parser.add_argument("--runner-fd", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    if opts.runner_fd is None:
        return front_main(argv)
    return asyncio.run(runner_main(opts, opts.runner_fd))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
