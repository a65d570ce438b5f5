"""Timing of a repeated region: warm-up, repetitions, median and p10/p90.

On CUDA each repetition is bracketed by CUDA events and the host synchronises once, after the
last one; on a CPU each repetition is timed with perf_counter. An optional ``between`` callable
(a cache flush) runs before every repetition, outside the measured region.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TimingStats:
    """Seconds per repetition; ``method`` says how they were taken."""

    samples_s: tuple[float, ...]
    method: str

    @property
    def median(self) -> float:
        return float(np.median(self.samples_s))

    @property
    def p10(self) -> float:
        return float(np.percentile(self.samples_s, 10))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.samples_s, 90))

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "median": self.median,
            "p10": self.p10,
            "p90": self.p90,
            "reps": len(self.samples_s),
            "method": self.method,
        }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_region(
    run: Callable[[int], object],
    device: torch.device,
    *,
    warmup: int,
    reps: int,
    between: Callable[[], None] | None = None,
    after_warmup: Callable[[], None] | None = None,
) -> TimingStats:
    """Time ``run(i)`` for i in range(reps) after ``warmup`` untimed calls.

    ``after_warmup`` runs once between the warm-up and the measured repetitions (to reset
    counters, say).
    """
    if reps < 1:
        raise ValueError("reps must be >= 1")
    for i in range(warmup):
        run(i)
    if after_warmup is not None:
        after_warmup()
    _synchronize(device)
    if device.type == "cuda":
        return _time_cuda(run, device, reps, between)
    return _time_host(run, reps, between)


def _time_cuda(
    run: Callable[[int], object], device: torch.device, reps: int, between: Callable[[], None] | None
) -> TimingStats:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if between is not None:
            between()
        starts[i].record()
        run(i)
        ends[i].record()
    torch.cuda.synchronize(device)
    return TimingStats(
        tuple(s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True)), "cuda-events"
    )


def _time_host(run: Callable[[int], object], reps: int, between: Callable[[], None] | None) -> TimingStats:
    samples = []
    for i in range(reps):
        if between is not None:
            between()
        start = time.perf_counter()
        run(i)
        samples.append(time.perf_counter() - start)
    return TimingStats(tuple(samples), "perf_counter")


class CacheFlusher:
    """Evicts the last-level cache by writing a buffer twice its size (run between repetitions)."""

    def __init__(self, llc_bytes: int, device: torch.device) -> None:
        self._buffer = torch.empty(max(2 * llc_bytes, 1 << 20) // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self._buffer.fill_(1.0)
