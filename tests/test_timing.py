"""Timing: statistics, interleaving order, warm-up and hooks."""

from __future__ import annotations

import time

import pytest
import torch

from moecap_kernels.timing import TimingStats, time_interleaved, time_region

CPU = torch.device("cpu")


def test_percentiles_of_known_samples():
    stats = TimingStats(tuple(float(v) for v in range(1, 12)), "perf_counter")
    assert (stats.median, stats.p10, stats.p90) == (6.0, 2.0, 10.0)


def test_interleaved_order_warmup_and_hooks():
    calls: list[tuple[str, int]] = []
    events: list[str] = []
    runs = [lambda i, n=n: calls.append((n, i)) for n in "AB"]
    stats = time_interleaved(
        runs,
        CPU,
        warmup=2,
        reps=3,
        between=lambda: events.append("flush"),
        after_warmup=[lambda: events.append("reset")],
        shuffle=False,
    )
    assert calls == [("A", 0), ("B", 0), ("A", 1), ("B", 1)] + [(n, i) for i in range(3) for n in "AB"]
    assert events == ["reset"] + ["flush"] * 6
    assert [len(s.samples_s) for s in stats] == [3, 3]


def test_interleaved_shuffles_each_repetition_reproducibly():
    def order() -> list[str]:
        calls: list[str] = []
        runs = [lambda i, n=n: calls.append(n) for n in "ABCD"]
        time_interleaved(runs, CPU, warmup=0, reps=40)
        return calls

    calls = order()
    reps = ["".join(calls[i : i + 4]) for i in range(0, len(calls), 4)]
    assert all(sorted(r) == list("ABCD") for r in reps)  # each run once per repetition
    assert len(set(reps)) > 5  # not one fixed order
    assert {r[0] for r in reps} == set("ABCD")  # every run takes the first place sometimes
    assert order() == calls  # seeded


def test_time_region_measures_the_region_not_the_flush():
    """The region sleeps 10 ms, the flush before it 500 ms: only the first may be in the samples (the
    bound is loose enough for a loaded machine, tight enough to catch the flush)."""
    stats = time_region(lambda i: time.sleep(0.01), CPU, warmup=0, reps=3, between=lambda: time.sleep(0.5))
    assert all(0.0099 < s < 0.5 for s in stats.samples_s)


def test_reps_must_be_positive():
    with pytest.raises(ValueError):
        time_region(lambda i: None, CPU, warmup=0, reps=0)
