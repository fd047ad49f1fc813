"""Named points where tests SIGKILL the agent, to prove each step of start and stop
survives a crash (systemd restarts, OOM kills and upgrades hit them sooner or later).

Off unless `STUDIOS_TEST_CRASH_FILE` names a file: tests write a point's name into it,
and the agent process that reaches that point deletes the file (so the restarted agent
runs through) and kills itself with SIGKILL: no cleanup, no flush, as in a real crash.
Production never sets the variable; then `reached` is a dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal

__all__ = ["ENV_VAR", "reached"]

ENV_VAR = "STUDIOS_TEST_CRASH_FILE"

log = logging.getLogger(__name__)


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
