"""systemd's notification protocol (sd_notify(3)), without a dependency.

A `Type=notify` service tells systemd through a datagram on the unix socket named by
$NOTIFY_SOCKET: `READY=1` once it serves, `STOPPING=1` when it begins to stop,
`STATUS=...` lines for `systemctl status`, and `WATCHDOG=1` at least once per
$WATCHDOG_USEC (when the unit sets `WatchdogSec=`). A name starting with `@` is an
abstract socket (Linux): the `@` stands for the leading NUL byte.

The watchdog is pinged from the event loop (`watchdog_loop`), at half the interval as
systemd recommends: a loop blocked for longer than the interval misses its pings, and
systemd kills and restarts the daemon, which is the point.

Without $NOTIFY_SOCKET (not under systemd, or `Type=exec`) every call does nothing.
The variables are taken out of the process environment when read, so that what the
daemon starts (tools, podman, mkfs) does not inherit them and cannot speak for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, MutableMapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """One daemon's messages to systemd; every method is a no-op when not enabled."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address or None
        # The watchdog interval in microseconds (None: the unit has no watchdog).
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._last_status = ""

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier:
        """The notifier systemd's variables describe (taken out of `environ` with `unset`).

        WATCHDOG_PID, when set, names the process the watchdog is meant for: another
        process (a parent shell, say) does not ping it."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        usec_text = env.get("WATCHDOG_USEC", "")
        pid_text = env.get("WATCHDOG_PID", "")
        if unset:
            for name in _VARIABLES:
                env.pop(name, None)
        usec: int | None = None
        if usec_text.isdigit() and (not pid_text or pid_text == str(os.getpid())):
            usec = int(usec_text)
        return cls(address or None, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of the watchdog interval (None: no watchdog)."""
        if self.address is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2_000_000

    def notify(self, *assignments: str) -> bool:
        """Send `assignments` (e.g. "READY=1", "STATUS=serving") as one datagram.

        False when not enabled or when the socket refused it (logged: systemd gone or
        the unit's NotifyAccess= does not admit this process)."""
        if self.address is None or not assignments:
            return False
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        elif not target.startswith("/"):
            # vsock: addresses (VMs) and anything else this client does not speak.
            log.warning("NOTIFY_SOCKET %r is not a unix socket; not notifying", self.address)
            return False
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(target)
                sock.sendall(payload)
        except OSError as exc:
            log.warning("notifying systemd at %s failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *self._status_lines(status))

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", *self._status_lines(status))

    def status(self, status: str) -> bool:
        """A STATUS= line, sent only when it changed."""
        lines = self._status_lines(status)
        return self.notify(*lines) if lines else False

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def _status_lines(self, status: str) -> list[str]:
        # One line: a newline would end the assignment and start another.
        text = " ".join(status.split())
        if not text or text == self._last_status:
            return []
        self._last_status = text
        return [f"STATUS={text}"]

    async def watchdog_loop(self, status: Callable[[], str] | None = None) -> None:
        """Ping the watchdog at half its interval, forever (cancel to end); with `status`,
        its text is sent along whenever it changed. Returns at once without a watchdog."""
        interval = self.watchdog_interval()
        if interval is None:
            return
        while True:
            lines = ["WATCHDOG=1"]
            if status is not None:
                try:
                    lines += self._status_lines(status())
                except Exception:  # a status text must never stop the pings
                    log.exception("status for systemd failed")
            self.notify(*lines)
            await asyncio.sleep(interval)
