"""Timing of a repeated region: warm-up, repetitions, median and p10/p90.

On CUDA each repetition is bracketed by CUDA events and the host synchronises once, after the
last one; on a CPU each repetition is timed with perf_counter. An optional ``between`` callable
(a cache flush, which reads a buffer) runs before every repetition, outside the measured region.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from moecap_kernels.streaming import distinct_pages, read_pass, stream_bytes


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
    method: str | None = None,
) -> TimingStats:
    """Time ``run(i)`` for i in range(reps) after ``warmup`` untimed calls.

    ``after_warmup`` runs once between the warm-up and the measured repetitions (to reset
    counters, say).
    """
    hooks = [after_warmup] if after_warmup is not None else []
    return time_interleaved(
        [run], device, warmup=warmup, reps=reps, between=between, after_warmup=hooks, method=method
    )[0]


def time_interleaved(
    runs: Sequence[Callable[[int], object]],
    device: torch.device,
    *,
    warmup: int,
    reps: int,
    between: Callable[[], None] | None = None,
    after_warmup: Sequence[Callable[[], None]] = (),
    shuffle: bool = True,
    method: str | None = None,
) -> list[TimingStats]:
    """Time several runs in turn so drift of the machine hits them all alike.

    Every repetition runs each of them once, in an order shuffled per repetition (seeded, so
    reproducible): in a fixed order A B A B … the run after A always finds the caches and threads
    as A left them, and that bias would fall on B alone. ``shuffle=False`` keeps the order.
    ``method`` names what the runs are when the clock's own name would not say it (graph replays).
    """
    if reps < 1:
        raise ValueError("reps must be >= 1")
    for i in range(warmup):
        for run in runs:
            run(i)
    for hook in after_warmup:
        hook()
    _synchronize(device)
    clock = _CudaClock(device) if device.type == "cuda" else _HostClock()
    if method is not None:
        clock.method = method
    order = list(range(len(runs)))
    shuffler = random.Random(0)
    for i in range(reps):
        if shuffle:
            shuffler.shuffle(order)
        for j in order:
            if between is not None:
                between()
            with clock.measure(j):
                runs[j](i)
    return [TimingStats(tuple(samples), clock.method) for samples in clock.seconds(len(runs))]


EAGER_HOST, EAGER_CUDA = "perf_counter", "cuda-events"  # TimingStats.method of a loop of calls


class _HostClock:
    method = EAGER_HOST

    def __init__(self) -> None:
        self._samples: dict[int, list[float]] = {}

    @contextmanager
    def measure(self, key: int) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self._samples.setdefault(key, []).append(time.perf_counter() - start)

    def seconds(self, n: int) -> list[list[float]]:
        return [self._samples[k] for k in range(n)]


class _CudaClock:
    """Events around each region, recorded on ``device``'s current stream (the stream the region's
    work is queued on; with ``cuda:N`` the current device may be another GPU, whose stream would be
    idle); elapsed times are read after one synchronisation at the end."""

    method = EAGER_CUDA

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._events: dict[int, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}

    @contextmanager
    def measure(self, key: int) -> Iterator[None]:
        stream = torch.cuda.current_stream(self._device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        yield
        end.record(stream)
        self._events.setdefault(key, []).append((start, end))

    def seconds(self, n: int) -> list[list[float]]:
        torch.cuda.synchronize(self._device)
        return [[s.elapsed_time(e) / 1e3 for s, e in self._events[k]] for k in range(n)]


class CacheFlusher:
    """Evicts the last-level cache between repetitions by reading a buffer twice its size.

    It reads, never writes: a flush that wrote would leave its own dirty lines in the cache, to be
    written back inside the next timed region. The buffer is bounded as every streamed buffer is
    (``streaming.stream_bytes``).
    """

    def __init__(self, llc_bytes: int, device: torch.device) -> None:
        self._buffer = distinct_pages(stream_bytes(llc_bytes, 2), device)
        self._read = read_pass(torch.device(device))

    @property
    def nbytes(self) -> int:
        return self._buffer.numel() * self._buffer.element_size()

    def __call__(self) -> None:
        self._read(self._buffer)
