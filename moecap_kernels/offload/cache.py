"""The exact behaviour of an expert cache of C experts over a routing sequence.

Each step needs its distinct experts; they are accessed in ascending id order, one access each. A
hit finds the expert in the fast tier; a miss fetches it from the slow tier and, when C > 0, puts
it in the fast tier, evicting one expert when the tier is full (C = 0: every access is a miss and
nothing is kept). The victim:

- ``lru``: the least recently accessed;
- ``lfu``: the least often accessed since the start (counts kept for evicted experts too), ties to
  the least recently accessed;
- ``belady``: the one whose next access is farthest in the future (never: farthest of all), ties to
  the lowest id — the optimal (MIN) policy, the oracle, from the known future of the sequence.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

POLICIES = ("lru", "lfu", "belady")


@dataclass(frozen=True)
class Access:
    """One expert access: which step and expert, a hit or not, what it evicted (-1: nothing)."""

    step: int
    expert: int
    hit: bool
    evicted: int = -1


def step_experts(ids: np.ndarray) -> list[list[int]]:
    """The distinct experts each step of an ``[S, T, k]`` sequence needs, ascending."""
    return [sorted({int(e) for e in step.ravel()}) for step in ids]


def _next_uses(steps: Sequence[Sequence[int]]) -> list[float]:
    """For each access in order, the position of the next access of the same expert (inf: none)."""
    flat = [e for step in steps for e in step]
    upcoming: dict[int, float] = {}
    out = [math.inf] * len(flat)
    for i in range(len(flat) - 1, -1, -1):
        out[i] = upcoming.get(flat[i], math.inf)
        upcoming[flat[i]] = i
    return out


def simulate(steps: Sequence[Sequence[int]], capacity: int, policy: str) -> list[list[Access]]:
    """Every access of every step, in order, under ``policy`` with ``capacity`` cached experts."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}")
    recency: OrderedDict[int, None] = OrderedDict()  # the cached experts, least recent first
    frequency: dict[int, int] = {}
    last_use: dict[int, int] = {}
    next_use: dict[int, float] = {}  # belady: each cached expert's next access
    nexts = _next_uses(steps) if policy == "belady" else []
    position = 0
    out = []
    for s, experts in enumerate(steps):
        accesses = []
        for e in experts:
            frequency[e] = frequency.get(e, 0) + 1
            hit = e in recency
            evicted = -1
            if hit:
                recency.move_to_end(e)
            elif capacity > 0:
                if len(recency) >= capacity:
                    evicted = _victim(policy, recency, frequency, last_use, next_use)
                    del recency[evicted]
                    next_use.pop(evicted, None)
                recency[e] = None
            last_use[e] = position
            if policy == "belady" and e in recency:
                next_use[e] = nexts[position]
            accesses.append(Access(s, e, hit, evicted))
            position += 1
        out.append(accesses)
    return out


def _victim(
    policy: str,
    recency: OrderedDict[int, None],
    frequency: dict[int, int],
    last_use: dict[int, int],
    next_use: dict[int, float],
) -> int:
    if policy == "lru":
        return next(iter(recency))
    if policy == "lfu":
        return min(recency, key=lambda e: (frequency[e], last_use[e]))
    return max(recency, key=lambda e: (next_use[e], -e))


@dataclass(frozen=True)
class CacheCounts:
    """Per step and in total: hits, misses, evictions (exact ints)."""

    hits: tuple[int, ...]
    misses: tuple[int, ...]
    evictions: tuple[int, ...]

    @classmethod
    def of(cls, accesses: list[list[Access]]) -> CacheCounts:
        return cls(
            tuple(sum(a.hit for a in step) for step in accesses),
            tuple(sum(not a.hit for a in step) for step in accesses),
            tuple(sum(a.evicted >= 0 for a in step) for step in accesses),
        )

    @property
    def hit_rate(self) -> float:
        total = sum(self.hits) + sum(self.misses)
        return sum(self.hits) / total if total else 0.0
