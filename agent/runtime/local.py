"""The `local` runtime: the tool is a plain process in the session directory.

For development and the quick start; no isolation. Tools run in their own process
session (`start_new_session`) with output to a log file, so they outlive the agent
and are re-adopted by the next agent process (identified by pid + create time, which
guards against pid reuse).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.errors import RuntimeStartError
from agent.runtime.base import (
    ExitStatus,
    LabelledTool,
    Runtime,
    RuntimeHandle,
    RuntimeOptions,
    StartSpec,
)

__all__ = ["BUILTIN_TEMPLATES", "LocalRuntime", "LocalTemplate", "load_templates"]

_POLL_INTERVAL = 0.2
_FIRST_POLL_INTERVAL = 0.005
# The label of a local tool, inherited by everything it starts: `<agent id>/<session
# id>/<generation>`. Processes have no labels of their own; the environment is the one
# place that a tool's children keep and that root can read back (/proc/PID/environ).
LABEL_ENV = "STUDIOS_TOOL_LABEL"
# Same process if the create time matches this closely (psutil derives it from ticks).
_CREATE_TIME_TOLERANCE = 0.05


@dataclass(frozen=True)
class LocalTemplate:
    command: tuple[str, ...]
    tool: str


BUILTIN_TEMPLATES: dict[str, LocalTemplate] = {
    "studios/python-http": LocalTemplate(
        command=(
            "{python}",
            "-m",
            "http.server",
            "{port}",
            "--bind",
            "127.0.0.1",
            "--directory",
            "{root_dir}",
        ),
        tool="python-http",
    ),
    # JupyterLab from PyPI (`pip install studios[jupyter]`), set up for the connect proxy
    # by agent/runtime/jupyter_tool.py; without the package the start fails naming it.
    "studios/jupyterlab": LocalTemplate(
        command=(
            "{python}",
            "-m",
            "agent.runtime.jupyter_tool",
            "--port={port}",
            "--root-dir={root_dir}",
        ),
        tool="jupyter",
    ),
}


def load_templates(path: Path | None) -> dict[str, LocalTemplate]:
    """The built-in table plus `--local-templates FILE` (which may override it)."""
    table = dict(BUILTIN_TEMPLATES)
    if path is None:
        return table
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of templates")
    for name, entry in raw.items():
        command = entry.get("command") if isinstance(entry, dict) else None
        if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
            raise ValueError(f"{path}: template {name!r} needs a list of strings in 'command'")
        table[name] = LocalTemplate(command=tuple(command), tool=str(entry.get("tool", name)))
    return table


def _describe_returncode(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class LocalRuntime(Runtime):
    name = "local"

    @classmethod
    def available(cls, options: RuntimeOptions) -> tuple[bool, str]:
        return True, "tools run as plain processes in the session directory (no isolation)"

    def __init__(self, options: RuntimeOptions) -> None:
        self.templates = load_templates(options.local_templates)
        # Our own children, so we can read their exit status. Recovered tools are not
        # our children and are watched through psutil instead.
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def resolve(self, image: str) -> LocalTemplate:
        name = image.split(":", 1)[0]
        try:
            return self.templates[name]
        except KeyError:
            raise RuntimeStartError(f"no local template for image {image}") from None

    async def start(self, spec: StartSpec) -> RuntimeHandle:
        template = self.resolve(spec.image)
        values = {"python": sys.executable, "port": str(spec.port), "root_dir": str(spec.root_dir)}
        try:
            argv = [arg.format(**values) for arg in template.command]
        except (KeyError, IndexError) as exc:
            raise RuntimeStartError(f"bad local template for image {spec.image}: {exc}") from None
        env = dict(os.environ)
        env.update(spec.environment)
        env["CONNECT_TOOL_PORT"] = str(spec.port)
        env["HOME"] = str(spec.root_dir)
        env[LABEL_ENV] = f"{self.owner}/{spec.session_id}/{spec.generation}"
        if spec.mounts:
            await _expose_mounts(spec)
        # Popen returns as soon as the child has exec'd: short enough to call inline.
        proc = _spawn(argv, spec.root_dir, env, spec.log_path)
        self._children[proc.pid] = proc
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            create_time = 0.0  # already gone; poll() reports its status
        return RuntimeHandle(
            session_id=spec.session_id,
            pid=proc.pid,
            create_time=create_time,
            port=spec.port,
            root_dir=str(spec.root_dir),
            log_path=str(spec.log_path),
            data={"argv": argv},
        )

    def _same_process(self, handle: RuntimeHandle) -> psutil.Process | None:
        try:
            proc = psutil.Process(handle.pid)
            if abs(proc.create_time() - handle.create_time) > _CREATE_TIME_TOLERANCE:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    async def poll(self, handle: RuntimeHandle) -> ExitStatus | None:
        child = self._children.get(handle.pid)
        if child is not None:
            code = child.poll()
            if code is None:
                return None
            return ExitStatus(code, _describe_returncode(code))
        if self._same_process(handle) is not None:
            return None
        # A zombie left by an earlier agent object in this same process (tests) can
        # still be reaped for its status; any other ended tool's status is lost.
        code = _reap(handle.pid)
        if code is not None:
            return ExitStatus(code, _describe_returncode(code))
        return ExitStatus(None, "exited (status unknown)")

    async def wait(self, handle: RuntimeHandle) -> ExitStatus:
        # Quick at first: a tool told to stop usually ends within milliseconds, and a
        # fixed 0.2 s poll made every stop 0.2 s slower; long waits settle at 0.2 s.
        delay = _FIRST_POLL_INTERVAL
        while True:
            status = await self.poll(handle)
            if status is not None:
                self._children.pop(handle.pid, None)
                return status
            await asyncio.sleep(delay)
            delay = min(2 * delay, _POLL_INTERVAL)

    def _signal_group(self, handle: RuntimeHandle, sig: signal.Signals) -> None:
        # Only signal when the leader is still *our* tool: a reused pid must not be hit.
        if self._same_process(handle) is None and handle.pid not in self._children:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(handle.pid, sig)

    async def stop(self, handle: RuntimeHandle, grace_seconds: float) -> ExitStatus | None:
        status = await self.poll(handle)
        if status is not None:
            self._children.pop(handle.pid, None)
            return status
        self._signal_group(handle, signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.wait(handle), timeout=grace_seconds)
        except TimeoutError:
            pass
        self._signal_group(handle, signal.SIGKILL)
        try:
            return await asyncio.wait_for(self.wait(handle), timeout=10)
        except TimeoutError:
            return None

    async def destroy(self, handle: RuntimeHandle) -> None:
        self._signal_group(handle, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait(handle), timeout=10)
        self._children.pop(handle.pid, None)

    async def recover(self, handle: RuntimeHandle) -> bool:
        if handle.pid <= 0:
            return False
        return self._same_process(handle) is not None or handle.pid in self._children

    async def logs(self, handle: RuntimeHandle, max_lines: int = 50) -> str:
        return await asyncio.to_thread(_tail, Path(handle.log_path), max_lines)

    async def labelled_tools(self) -> list[LabelledTool]:
        if not self.owner:
            return []
        return await asyncio.to_thread(_labelled_process_groups, self.owner)

    async def remove_labelled(self, tool: LabelledTool) -> None:
        pgid = int(tool.ref)
        if pgid <= 1 or pgid == os.getpgrp():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        for pid in list(self._children):
            _reap(pid)

    async def reap(self, handle: RuntimeHandle) -> None:
        # A start killed between spawning the tool and recording its pid left a process
        # group that only its label names.
        for tool in await self.labelled_tools():
            if tool.session_id == handle.session_id:
                await self.remove_labelled(tool)


async def _expose_mounts(spec: StartSpec) -> None:
    """Data-links and file-system mounts at their paths below the session root."""
    from agent.runtime.binds import expose_binds

    try:
        await asyncio.to_thread(expose_binds, spec.root_dir, spec.mounts)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise RuntimeStartError(f"cannot make the mounts visible in the session: {exc}") from None


def _spawn(
    argv: list[str], cwd: Path, env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        try:
            return subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session: the tool survives the agent and gets signals as a group.
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise RuntimeStartError(f"cannot run {argv[0]}: {exc.strerror}") from None


def _labelled_process_groups(owner: str) -> list[LabelledTool]:
    """One entry per process group holding a process labelled by agent `owner`."""
    groups: dict[int, LabelledTool] = {}
    prefix = owner + "/"
    for proc in psutil.process_iter():
        try:
            label = proc.environ().get(LABEL_ENV, "")
            if not label.startswith(prefix):
                continue
            pgid = os.getpgid(proc.pid)
            name = proc.name()
        except (psutil.Error, OSError):
            continue  # gone, a zombie, or not ours to read
        _, session, generation = label.split("/", 2)
        if pgid not in groups and generation.isdigit():
            groups[pgid] = LabelledTool(
                session_id=session,
                generation=int(generation),
                ref=str(pgid),
                description=f"process group {pgid} ({name})",
            )
    return list(groups.values())


def _reap(pid: int) -> int | None:
    """Exit code of `pid` if it is an unreaped child of this process, else None."""
    with contextlib.suppress(ChildProcessError, OSError):
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return os.waitstatus_to_exitcode(status)
    return None


def _tail(path: Path, max_lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except FileNotFoundError:
        return ""
    lines = data.decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-max_lines:])


def create_local_runtime(options: RuntimeOptions) -> Runtime:
    return LocalRuntime(options)
