"""How much of the machine's CPU time went to something else while a region ran.

A measurement made while other processes run (or while the hypervisor gives our virtual CPUs' time
to other guests: "steal") reads a slower machine than the quiet one. Linux's /proc/stat counts, per
machine, the time every CPU spent busy or stolen; our own CPU time is this process's (all its
threads) and that of its children it has waited for (a compiler it ran, say). What is left of the
busy time is somebody else's:

    others_share = (busy + steal − own CPU time) / (wall time × CPUs)

Where /proc/stat is absent (macOS, Windows) the share is unknown (None).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
# /proc/stat's "cpu" line: user nice system idle iowait irq softirq steal (then guest times, which
# are already counted in user and nice). Idle and iowait are the not-busy columns.
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


def _busy_seconds(stat: Path) -> float | None:
    """Seconds every CPU of the machine spent busy or stolen since boot; None if unreadable."""
    try:
        with stat.open() as handle:
            fields = handle.readline().split()
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    if len(fields) < 9 or fields[0] != "cpu" or not all(f.isdigit() for f in fields[1:9]):
        return None
    values = [int(f) for f in fields[1:9]]
    return sum(values[i] for i in _BUSY_COLUMNS) / ticks


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


@dataclass
class OthersShare:
    """Use as ``with OthersShare() as load: ...``; then ``load.share`` (None when unknown)."""

    stat: Path = PROC_STAT
    share: float | None = None

    def __enter__(self) -> OthersShare:
        self._busy = _busy_seconds(self.stat)
        self._own = _own_cpu_seconds()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy = _busy_seconds(self.stat)
        wall = time.perf_counter() - self._wall
        cpus = os.cpu_count() or 1
        if busy is None or self._busy is None or wall <= 0:
            self.share = None
            return
        others = (busy - self._busy) - (_own_cpu_seconds() - self._own)
        # Tick sampling makes the two clocks disagree by a tick or so: a tiny negative is zero.
        self.share = max(others, 0.0) / (wall * cpus)
