"""A session's custom environment, built into an image before its tool starts.

The runner calls `EnvironmentBuild.run` first thing in a start whose spec carries a
conda environment file: the session is `building` (the step's message is the build's
last output line) until the image exists, then `starting` with that image. A build that
fails ends the generation as `buildFailed` before anything else of the session exists
(no volume, no restore, no mounts): nothing else changed. The build itself, its cache by
content and its limits are agent.images'; this module is the session's side of it —
what is saved in the handle, what is reported, and what an agent restarted mid-build
does (end the orphaned build's process group, then build again: podman's layer cache
makes that partly a resume).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import crash_points
from agent.errors import AgentError
from agent.images.env_builder import (
    EnvBuildFailed,
    EnvBuildLimits,
    build_environment,
    kill_leftover_build,
)
from agent.sessions.context import SessionContext
from agent.sessions.handle import SessionHandle
from agent.sessions.report import STEP_BUILD

__all__ = ["BuildFailed", "EnvironmentBuild", "end_orphaned_build", "log_for_report"]

log = logging.getLogger(__name__)

# What of a failed build's log reaches the controller (and through it the API): its
# start (the Containerfile, the first steps) and its end (the error).
_REPORT_HEAD = 32 * 1024
_REPORT_TAIL = 224 * 1024
# Progress lines are reported at most this often (a pip install prints hundreds).
_REPORT_EVERY = 0.5


class BuildFailed(AgentError):
    """The environment could not be built; str() is the status message."""


@dataclass(frozen=True, slots=True)
class _Reported:
    log: str
    truncated: bool


def log_for_report(path: Path | None) -> _Reported:
    if path is None:
        return _Reported("", False)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return _Reported(f"[the build log {path} cannot be read: {exc.strerror}]", False)
    if len(data) <= _REPORT_HEAD + _REPORT_TAIL:
        return _Reported(data.decode("utf-8", "replace"), False)
    omitted = len(data) - _REPORT_HEAD - _REPORT_TAIL
    text = (
        data[:_REPORT_HEAD].decode("utf-8", "replace")
        + f"\n[... {omitted} bytes omitted ...]\n"
        + data[-_REPORT_TAIL:].decode("utf-8", "replace")
    )
    return _Reported(text, True)


def end_orphaned_build(h: SessionHandle) -> bool:
    """An earlier agent process's build of this session, if it still runs: ended."""
    if not h.build_pid:
        return False
    killed = kill_leftover_build(h.build_pid, h.build_create_time)
    if killed:
        log.info("session %s: ended the build an earlier agent left", h.session_id)
    h.build_pid, h.build_create_time = 0, 0.0
    return killed


class EnvironmentBuild:
    def __init__(self, ctx: SessionContext) -> None:
        self.ctx = ctx

    def _limits(self) -> EnvBuildLimits:
        s = self.ctx.settings
        return EnvBuildLimits(
            timeout_seconds=s.env_build_timeout_seconds,
            disk_bytes=s.env_build_disk_bytes,
            conda_channels=tuple(s.conda_channels),
        )

    async def run(self, h: SessionHandle, template_image: str) -> str:
        """Build (or find) the image of `h`'s environment; its reference. The handle is
        `building` meanwhile; BuildFailed with the status message when it fails."""
        ctx = self.ctx
        if ctx.runtime.name != "podman":
            raise BuildFailed(
                "custom environments need the podman runtime; this agent runs "
                f"{ctx.runtime.name!r} (start it with --runtime podman), or remove the "
                "studio's condaEnvironment"
            )
        end_orphaned_build(h)
        h.status, h.message = "building", "building the environment"
        h.set_step(STEP_BUILD, "in_progress", "building the environment")
        await ctx.save_and_report(h)
        last = [0.0]

        def on_line(line: str) -> None:
            step = h.step(STEP_BUILD)
            if step is not None:
                step.message = line[:200]
            now = time.monotonic()
            if now - last[0] >= _REPORT_EVERY:
                last[0] = now
                ctx.report(h)

        def on_process(pid: int, create_time: float) -> None:
            # Saved before the build goes on: a restarted agent finds and ends it.
            h.build_pid, h.build_create_time = pid, create_time
            ctx.state.save_handle_json(h.session_id, h.to_json())
            crash_points.reached("start:building")

        log_path = ctx.state.build_log_path(h.session_id)
        try:
            result = await build_environment(
                template_image,
                h.spec.conda_environment,
                limits=self._limits(),
                log_path=log_path,
                on_line=on_line,
                on_process=on_process,
            )
        except EnvBuildFailed as exc:
            reported = log_for_report(exc.log_path)
            h.build = _build_record(failed=True, log=reported.log, log_truncated=reported.truncated)
            h.build_pid, h.build_create_time = 0, 0.0
            h.set_step(STEP_BUILD, "errored", exc.reason or str(exc).splitlines()[0])
            raise BuildFailed(f"environment build failed: {exc}") from exc
        except asyncio.CancelledError:
            raise
        h.build_pid, h.build_create_time = 0, 0.0
        h.build = _build_record(
            env_hash=result.env_hash,
            image=result.reference,
            cached=result.cached,
            seconds=round(result.seconds, 1),
        )
        done = (
            f"built before: {result.reference}"
            if result.cached
            else f"built {result.reference} in {result.seconds:.0f} s"
        )
        h.set_step(STEP_BUILD, "succeeded", done)
        return result.reference


def _build_record(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v not in ("", None, False)}
