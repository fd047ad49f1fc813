"""How much of this virtual machine's CPU its hypervisor gave to someone else while a
benchmark phase ran (the `steal` column of /proc/stat).

On this kind of host the two vCPUs are shared: the same phase ran at 1.6 s and at 2.5 s
with the same CPU time minutes apart while steal went from a few percent to half. The
load average cannot show this (it counts only this machine's runnable tasks), so each
timed phase reports its steal beside its figures, and a ratio taken while one side had
much more stolen than the other can be told from a change in the code.
"""

from __future__ import annotations

import time
from types import TracebackType

__all__ = ["StealMeter", "cpu_jiffies"]


def cpu_jiffies() -> tuple[int, int, int] | None:
    """(steal, idle, total) over all CPUs since boot, idle counting iowait; None where
    /proc/stat has no steal."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != b"cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    values = [int(v) for v in fields[1:9]]
    return values[7], values[3] + values[4], sum(values)


class StealMeter:
    """`with StealMeter() as m: ...` then `m.pct`: the share of the host's CPU time
    stolen during the block, in percent (None where the kernel does not report it),
    `m.busy_pct`: the share of the CPU time left to this machine that it spent busy
    (kernel workers included, which no process's CPU time shows), and `m.seconds`: the
    block's wall time, so that a phase is timed once."""

    def __init__(self) -> None:
        self._start: tuple[int, int, int] | None = None
        self.pct: float | None = None
        self.busy_pct: float | None = None
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> StealMeter:
        self._start = cpu_jiffies()
        self._t0 = time.monotonic()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.seconds = time.monotonic() - self._t0
        end = cpu_jiffies()
        if self._start is None or end is None:
            return
        steal, idle, total = (b - a for a, b in zip(self._start, end, strict=True))
        # A block shorter than a jiffy on every CPU measures nothing.
        if total > 0:
            self.pct = round(100.0 * steal / total, 1)
        if total - steal > 0:
            self.busy_pct = round(100.0 * (total - steal - idle) / (total - steal), 1)
