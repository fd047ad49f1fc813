"""The `local` runtime: the tool is a plain process in the session directory.

For development, the quick start and single-user hosts: no container, no network or
resource isolation. Tools run in their own process session (`start_new_session`) with
output to a log file, so they outlive the agent and are re-adopted by the next agent
process (identified by pid + create time, which guards against pid reuse).

Who runs a tool (`RuntimeOptions.local_tool_user`):

- an agent running as root gives every session a uid of its own (`session`, the
  default): a number from `local_uids` that no account, no process and no other
  session's directory holds, the same number as its gid, no supplementary groups, no
  passwd entry needed. The session's tree is that uid's (a restored checkpoint, even
  one of another session, is handed over before the tool starts; the hand-over also
  drops set-user-ID bits and file capabilities a checkpoint might carry), its root is
  0700, and its session directory (`DIR/sessions/<sid>`) is 0710 root:<its gid>, so
  it reaches its own root and nobody else's. When the tool ends, every process of its
  uid ends with it. `agent` runs tools as the agent's user instead (development only).
- an agent that is not root (a laptop) runs tools as its own user: nothing separates
  sessions from each other or from the agent, as `doctor` says.

Either way the tool's environment is made from nothing, never the agent's (which may
hold the checkpoint store's keys): a fixed PATH, HOME (the session root), USER,
LOGNAME, LANG, the studio's `configuration.environment` (checked by
`studios_shared.environment`) and the runtime's own CONNECT_TOOL_PORT, CONNECT_PROXY_SECRET
and label. Other users cannot read it back: /proc/PID/environ is its user's and root's only.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import pwd
import signal
import stat
import subprocess
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.errors import RuntimeStartError
from agent.host_mounts import mount_points_under
from agent.runtime.base import (
    TOOL_USERS,
    ExitStatus,
    LabelledTool,
    Runtime,
    RuntimeHandle,
    RuntimeOptions,
    StartSpec,
    connect_variables,
)

__all__ = [
    "BUILTIN_TEMPLATES",
    "LocalRuntime",
    "LocalTemplate",
    "ToolUser",
    "load_templates",
    "tool_environment",
]

log = logging.getLogger(__name__)

_POLL_INTERVAL = 0.2
_FIRST_POLL_INTERVAL = 0.005
# The label of a local tool, inherited by everything it starts: `<agent id>/<session
# id>/<generation>`. Processes have no labels of their own; the environment is the one
# place that a tool's children keep and that root can read back (/proc/PID/environ).
LABEL_ENV = "STUDIOS_TOOL_LABEL"
# Same process if the create time matches this closely (psutil derives it from ticks).
_CREATE_TIME_TOLERANCE = 0.05
# The tool's PATH: the agent's interpreter first (the templates' `{python}`), then the
# usual system directories; never the agent's own PATH.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_AGENT_MODE_HINT = (
    "the local runtime runs each session's tool as a user of its own; make it reachable "
    "by other users, or run the agent with --local-tool-user agent (tools as the agent's "
    "user: development only)"
)


@dataclass(frozen=True)
class ToolUser:
    """Who a tool runs as."""

    uid: int
    gid: int
    # USER and LOGNAME of the tool.
    name: str
    # A per-session uid the agent switches to (else the agent's own user).
    separate: bool


@dataclass(frozen=True)
class LocalTemplate:
    command: tuple[str, ...]
    tool: str


BUILTIN_TEMPLATES: dict[str, LocalTemplate] = {
    # The session's root as web pages (agent/runtime/http_tool.py: Python's http.server
    # behind a check of the proxy's secret).
    "studios/python-http": LocalTemplate(
        command=(
            "{python}",
            "-m",
            "agent.runtime.http_tool",
            "--port={port}",
            "--root-dir={root_dir}",
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
        return True, "plain processes (development and single-user hosts): " + tools_run_as(options)

    def __init__(self, options: RuntimeOptions) -> None:
        if options.local_tool_user not in TOOL_USERS:
            raise ValueError(
                f"--local-tool-user {options.local_tool_user!r}: expected one of "
                + ", ".join(TOOL_USERS)
            )
        first, count = options.local_uids
        if first < 1000 or count < 1 or first + count > 2**31:
            raise ValueError(f"bad uid range for local tools: {first}+{count}")
        self.templates = load_templates(options.local_templates)
        self.separate = options.local_tool_user == "session" and os.geteuid() == 0
        self.uid_range = range(first, first + count)
        # Our own children, so we can read their exit status. Recovered tools are not
        # our children and are watched through psutil instead.
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        # session id -> its uid, while it has a tool (or one is starting).
        self._uids: dict[str, int] = {}
        self._uid_lock = threading.Lock()

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
        user = await asyncio.to_thread(self._tool_user, spec)
        env = tool_environment(spec, user, f"{self.owner}/{spec.session_id}/{spec.generation}")
        try:
            if spec.mounts:
                await _expose_mounts(spec)
            # After the mounts (whose mount points it leaves alone): the directories
            # made for them are the tool's too.
            await asyncio.to_thread(_hand_over, spec, user)
            # Popen returns as soon as the child has exec'd: short enough to call inline.
            proc = _spawn(argv, spec.root_dir, env, spec.log_path, user)
        except BaseException:
            self._release_uid(spec.session_id)
            raise
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
            data={"argv": argv, "uid": user.uid, "gid": user.gid, "separate": user.separate},
        )

    def _tool_user(self, spec: StartSpec) -> ToolUser:
        if not self.separate:
            uid, gid = os.geteuid(), os.getegid()
            return ToolUser(uid, gid, _user_name(uid), separate=False)
        uid = self._allocate_uid(spec.session_id, spec.root_dir.parent.parent)
        return ToolUser(uid, uid, f"studios-{uid}", separate=True)

    def _allocate_uid(self, session_id: str, sessions_dir: Path) -> int:
        """A uid for `session_id` that nothing else holds: no other session of this
        runtime, no other session directory, no process, no account or group. The
        search starts at a place of the session id's, so a session usually gets the
        same uid again (and restoring its own checkpoint changes no owner)."""
        with self._uid_lock:
            taken = {u for s, u in self._uids.items() if s != session_id}
            taken |= _session_root_owners(sessions_dir, session_id, self.uid_range)
            taken |= _process_uids()
            first, count = self.uid_range.start, len(self.uid_range)
            offset = zlib.crc32(session_id.encode()) % count
            for i in range(count):
                uid = first + (offset + i) % count
                if uid in taken or _has_account(uid):
                    continue
                self._uids[session_id] = uid
                return uid
        raise RuntimeStartError(
            f"no free uid for the tool: all {count} of {first}-{first + count - 1} are taken"
        )

    def _release_uid(self, session_id: str) -> None:
        with self._uid_lock:
            self._uids.pop(session_id, None)

    async def _end_tool_user(self, handle: RuntimeHandle) -> None:
        """The tool has ended: so does every process of its session's uid (what it left
        running in other process groups), and the uid is free again."""
        uid = _separate_uid(handle, self.uid_range)
        if uid is not None:
            await asyncio.to_thread(_kill_uid, uid)
        self._release_uid(handle.session_id)

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
                await self._end_tool_user(handle)
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
        status = await self._stop(handle, grace_seconds)
        if status is not None:
            await self._end_tool_user(handle)
        return status

    async def _stop(self, handle: RuntimeHandle, grace_seconds: float) -> ExitStatus | None:
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
        await self._end_tool_user(handle)

    async def recover(self, handle: RuntimeHandle) -> bool:
        if handle.pid <= 0:
            return False
        alive = self._same_process(handle) is not None or handle.pid in self._children
        uid = _separate_uid(handle, self.uid_range)
        if alive and uid is not None:
            with self._uid_lock:
                self._uids[handle.session_id] = uid
            # systemd's StateDirectoryMode, or the agent's own StateDir.ensure, may have
            # closed DIR again since the tool started: its user must still get through.
            user = ToolUser(uid, int(handle.data.get("gid", uid)), f"studios-{uid}", True)
            try:
                await asyncio.to_thread(_open_path_to, Path(handle.root_dir).parent, user)
            except (OSError, RuntimeStartError) as exc:
                log.warning(
                    "session %s: its tool's user cannot reach it: %s", handle.session_id, exc
                )
        return alive

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
        uid = -1
        with contextlib.suppress(psutil.Error):
            uid = psutil.Process(pgid).uids().real
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        # A per-session uid no live tool holds: whatever else runs as it goes too.
        if self.separate and uid in self.uid_range and uid not in self._uids.values():
            await asyncio.to_thread(_kill_uid, uid)
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


def tools_run_as(options: RuntimeOptions) -> str:
    """Who runs local tools with these options on this host (for `doctor`)."""
    uid = os.geteuid()
    if uid != 0:
        return f"tools run as {_user_name(uid)} (agent is not root: no separation between sessions)"
    if options.local_tool_user == "agent":
        return (
            "tools run as root, the agent's user (--local-tool-user agent): no separation "
            "from the agent or between sessions; development only"
        )
    first, count = options.local_uids
    return (
        f"tools run as a user of their own per session (uids {first}-{first + count - 1}), "
        "in a 0700 session directory, with a clean environment"
    )


def tool_environment(spec: StartSpec, user: ToolUser, label: str) -> dict[str, str]:
    """The tool's whole environment: nothing of the agent's."""
    env = {
        "PATH": f"{os.path.dirname(sys.executable)}:{SYSTEM_PATH}",
        "HOME": str(spec.root_dir),
        "USER": user.name,
        "LOGNAME": user.name,
        "LANG": "C.UTF-8",
    }
    # Checked (StartSpec): none of the names above but LANG, none of the ones below.
    env.update(spec.environment)
    env.update(connect_variables(spec))
    env[LABEL_ENV] = label
    return env


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _has_account(uid: int) -> bool:
    """Whether a user or group of that number exists (then it is not ours to take)."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


def _process_uids() -> set[int]:
    found: set[int] = set()
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info.get("uids")
        if uids is not None:
            found.update((uids.real, uids.effective, uids.saved))
    return found


def _session_root_owners(sessions_dir: Path, session_id: str, uids: range) -> set[int]:
    """Owners (in `uids`) of the other sessions' roots: their data is still on the host."""
    found: set[int] = set()
    try:
        entries = list(os.scandir(sessions_dir))
    except OSError:
        return found
    for entry in entries:
        if entry.name == session_id:
            continue
        with contextlib.suppress(OSError):
            owner = os.lstat(os.path.join(entry.path, "root")).st_uid
            if owner in uids:
                found.add(owner)
    return found


def _separate_uid(handle: RuntimeHandle, uids: range) -> int | None:
    """The per-session uid a handle's tool ran as; never root nor the agent's own."""
    uid = handle.data.get("uid")
    if not handle.data.get("separate") or not isinstance(uid, int):
        return None
    if uid not in uids or uid in (0, os.geteuid()):
        return None
    return uid


def _kill_uid(uid: int) -> None:
    """SIGKILL every process running as `uid` (a per-session uid: its tool has ended)."""
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info.get("uids")
        if uids is not None and uid in (uids.real, uids.effective, uids.saved):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def _hand_over(spec: StartSpec, user: ToolUser) -> None:
    """The session's directories, before the tool starts: the root 0700 and the tool's,
    the session directory 0710 root:<tool's gid> (0700 when the tool is the agent's
    user); the directories above it must let the tool through."""
    root, session_dir = spec.root_dir, spec.root_dir.parent
    if not user.separate:
        os.chmod(session_dir, 0o700)
        os.chmod(root, 0o700)
        return
    # Closed while the tree changes hands (the volume made it 0700 already).
    os.chmod(session_dir, 0o700)
    _chown_tree(root, user.uid, user.gid)
    os.chmod(root, 0o700)
    os.chown(session_dir, os.geteuid(), user.gid)
    os.chmod(session_dir, 0o710)
    _open_path_to(session_dir, user)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    """Every file and directory below `root` (and `root`) to uid:gid, symlinks
    themselves, never through a mount (data-links, file-system mounts) nor onto another
    file system. Each entry is chowned even when its owner is right already: chown
    drops set-user-ID and set-group-ID bits and file capabilities (security.capability)
    of what it changes, which a restored checkpoint must not carry into the session."""
    mounts = {p for p, _ in mount_points_under(root)}
    top = os.path.realpath(root)
    device = os.lstat(top).st_dev
    os.lchown(top, uid, gid)
    for dirpath, dirnames, filenames in os.walk(top):
        kept = []
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if path in mounts:
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if st.st_dev != device:
                continue
            os.lchown(path, uid, gid)
            if stat.S_ISDIR(st.st_mode):
                kept.append(name)
        dirnames[:] = kept
        for name in filenames:
            path = os.path.join(dirpath, name)
            if path in mounts:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.lchown(path, uid, gid)


def _open_path_to(session_dir: Path, user: ToolUser) -> None:
    """Let the tool's user pass through the directories above its session directory.

    The agent's own two (`DIR/sessions` and the state directory `DIR`) are made 0711:
    others may pass through to a name they know, never list or write (the agent's files
    in them are 0600 or in 0700 directories). Any directory further up that does not let
    the tool through errors the start, naming it."""
    ours = (session_dir.parent, session_dir.parent.parent)
    for directory in ours:
        st = os.stat(directory)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o711:
            os.chmod(directory, 0o711)
    for directory in session_dir.parents:
        st = os.stat(directory)
        if not _may_search(st, user):
            raise RuntimeStartError(
                f"uid {user.uid} cannot reach the session directory {session_dir}: "
                f"{directory} is mode {stat.S_IMODE(st.st_mode):o}, owner {st.st_uid}; "
                + _AGENT_MODE_HINT
            )


def _may_search(st: os.stat_result, user: ToolUser) -> bool:
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == user.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


# Becomes the tool's user, then the tool: run as `python -I -S -c SWITCH_USER uid gid
# argv...` by root. Popen could switch itself (user=, group=, extra_groups=), but then
# it forks instead of using vfork, and the fork handlers of gRPC's threads crash the child
# now and then (`ev_epoll1_linux.cc: Check failed`); an exec'd interpreter has no threads.
SWITCH_USER = """
import os, sys
uid, gid, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    print("cannot run %s as uid %d: %s (%s)" % (argv[0], uid, exc.strerror, sys.argv[0]),
          file=sys.stderr, flush=True)
    os._exit(127)
"""


def switch_user_argv(uid: int, gid: int, argv: list[str], hint: str = "") -> list[str]:
    """`argv` run as uid:gid without supplementary groups (started by root)."""
    code = SWITCH_USER.replace("sys.argv[0]", repr(hint or "-"))
    return [sys.executable, "-I", "-S", "-c", code, str(uid), str(gid), *argv]


def _spawn(
    argv: list[str], cwd: Path, env: dict[str, str], log_path: Path, user: ToolUser
) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The agent's file in the session directory, written to by the tool's stdout.
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    run = switch_user_argv(user.uid, user.gid, argv, _AGENT_MODE_HINT) if user.separate else argv
    with open(fd, "ab") as log:
        try:
            return subprocess.Popen(
                run,
                # As root, before the switch: the tool starts in its root whatever the
                # directories above let its user do.
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
            raise RuntimeStartError(f"cannot run {run[0]}: {exc.strerror}") from None


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
