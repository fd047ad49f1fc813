"""Named points where tests SIGKILL the agent, to prove each step of start and stop
survives a crash (systemd restarts, OOM kills and upgrades hit them sooner or later).

Off unless `STUDIOS_TEST_CRASH_FILE` names a file: tests write a point's name into it,
and the agent process that reaches that point deletes the file (so the restarted agent
runs through) and kills itself with SIGKILL: no cleanup, no flush, as in a real crash.
Production never sets the variable; then `reached` is a dictionary lookup.

`hold(point)` is the same idea for a pause: when `STUDIOS_TEST_PAUSE_FILE` names a file
holding that point's name, the agent waits there (the event loop runs on) until the test
deletes the file, so a test can act while a step is in progress (a cancel mid-restore).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

__all__ = ["ENV_VAR", "PAUSE_ENV_VAR", "hold", "reached"]

ENV_VAR = "STUDIOS_TEST_CRASH_FILE"
PAUSE_ENV_VAR = "STUDIOS_TEST_PAUSE_FILE"
# The longest a pause point holds, so that a test that forgets its file cannot hang an agent.
_HOLD_MAX_SECONDS = 120.0
_HOLD_POLL_SECONDS = 0.05

log = logging.getLogger(__name__)


async def hold(point: str) -> None:
    path = os.environ.get(PAUSE_ENV_VAR)
    if not path or _named(path) != point:
        return
    log.warning("pause point %s reached: holding while %s exists (test hook)", point, path)
    for _ in range(int(_HOLD_MAX_SECONDS / _HOLD_POLL_SECONDS)):
        if _named(path) is None:
            return
        await asyncio.sleep(_HOLD_POLL_SECONDS)


def _named(path: str) -> str | None:
    """The point a test's file names, or None."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def reached(point: str) -> None:
    path = os.environ.get(ENV_VAR)
    if not path:
        return
    try:
        with open(path) as f:
            wanted = f.read().strip()
    except OSError:
        return
    if wanted != point:
        return
    try:
        os.unlink(path)
    except OSError:
        return  # another agent process took it
    log.warning("crash point %s reached: SIGKILL (test hook %s)", point, ENV_VAR)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
