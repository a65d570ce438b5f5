"""Others' share of the CPU time, from a /proc/stat-like file."""

from __future__ import annotations

import os
import time
from pathlib import Path

from moecap_kernels.hardware import cpu_load


def _stat(path: Path, user: int, steal: int = 0, idle: int = 1000) -> None:
    # cpu user nice system idle iowait irq softirq steal guest guest_nice
    path.write_text(f"cpu  {user} 0 0 {idle} 0 0 0 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")


def test_busy_seconds_counts_busy_and_stolen_ticks_not_idle(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    _stat(stat, user=300, steal=50, idle=10_000)
    ticks = os.sysconf("SC_CLK_TCK")
    assert cpu_load._busy_seconds(stat) == 350 / ticks
    stat.write_text("intr 1 2 3\n")
    assert cpu_load._busy_seconds(stat) is None
    assert cpu_load._busy_seconds(tmp_path / "absent") is None


def test_others_share_is_the_busy_time_that_was_not_ours(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    ticks = os.sysconf("SC_CLK_TCK")
    cpus = os.cpu_count() or 1
    _stat(stat, user=1000)
    with cpu_load.OthersShare(stat) as load:
        started = time.perf_counter()
        _stat(stat, user=1000 + 2 * ticks)  # 2 s of somebody else's CPU time; we only sleep
        time.sleep(0.2)
        wall = time.perf_counter() - started
    assert load.share is not None
    # our own CPU time (a few ms at most) is subtracted from the 2 s; the wall time is at least 0.2 s
    assert 1.9 / (wall * cpus + 0.1) < load.share <= 2.0 / (0.2 * cpus)


def test_share_is_unknown_without_proc_stat(tmp_path: Path) -> None:
    with cpu_load.OthersShare(tmp_path / "absent") as load:
        pass
    assert load.share is None


def test_children_we_waited_for_are_our_own_time(tmp_path: Path) -> None:
    """A compiler the calibration ran (the extension's build) is not somebody else's load: the
    machine's busy time grows by exactly the child's CPU time, and the share stays near zero."""
    import subprocess
    import sys

    stat = tmp_path / "stat"
    ticks = os.sysconf("SC_CLK_TCK")
    _stat(stat, user=1000)
    started = time.perf_counter()
    with cpu_load.OthersShare(stat) as load:
        before = os.times()
        subprocess.run([sys.executable, "-c", "sum(i * i for i in range(4_000_000))"], check=True)
        after = os.times()
        child = (after.children_user + after.children_system) - (
            before.children_user + before.children_system
        )
        own = (after.user + after.system) - (before.user + before.system)
        _stat(stat, user=1000 + round((child + own) * ticks))  # the machine saw only us and our child
    wall = time.perf_counter() - started
    assert child > 0.05 and load.share is not None
    as_others = child / (wall * (os.cpu_count() or 1))  # the share, were the child's time not ours
    assert load.share < 0.25 * as_others
