"""How much of this virtual machine's CPU its hypervisor gave to someone else while a
benchmark phase ran (the `steal` column of /proc/stat).

On this kind of host the two vCPUs are shared: the same phase ran at 1.6 s and at 2.5 s
with the same CPU time minutes apart while steal went from a few percent to half. The
load average cannot show this (it counts only this machine's runnable tasks), so each
timed phase reports its steal beside its figures, and a ratio taken while one side had
much more stolen than the other can be told from a change in the code.
"""

from __future__ import annotations

import gc
import time
from types import TracebackType
from typing import Any

__all__ = ["GcMeter", "StealMeter", "cpu_jiffies"]


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


class GcMeter:
    """`with GcMeter() as m: ...` then `m.seconds` (the wall time this process spent in
    the cyclic garbage collector during the block, all threads stopped) and
    `m.full_collections` (how many of those were of the oldest generation).

    A full collection walks every tracked object in the process, so its cost follows
    what the process held before the block, not what the block did: in
    bench_checkpoint, a file:// backup run after the S3 phase (botocore's models and
    the S3 phase's leftovers, ~280,000 objects) paid 0.24-0.26 s for one, in 1.54 s,
    where the same backup in a fresh process paid 0.03-0.05 s."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full_collections = 0
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._started
        if info.get("generation") == 2:
            self.full_collections += 1

    def __enter__(self) -> GcMeter:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        gc.callbacks.remove(self._callback)
