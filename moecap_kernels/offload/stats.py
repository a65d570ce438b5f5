"""What a routing sequence asks of an expert cache, per layer: exact statistics of its accesses.

- distinct experts per step (min, mean, max);
- the working set: distinct experts over a window of W consecutive steps (mean over windows);
- the experts that carry 90% of the routed pairs (most popular first);
- the entropy of expert popularity (bits, and over its maximum log2 E);
- the reuse distance of each access (the LRU stack distance: distinct other experts accessed since
  this expert's previous access; an LRU cache of C experts hits exactly the accesses below C), as
  a histogram in powers of two, first accesses apart.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moecap_kernels.offload.cache import step_experts

WINDOWS = (1, 4, 16, 64)


def reuse_distances(steps: list[list[int]]) -> list[int | None]:
    """The LRU stack distance of every access in order (None: the expert's first access)."""
    stack: list[int] = []  # most recent last
    out: list[int | None] = []
    for experts in steps:
        for e in experts:
            if e in stack:
                i = stack.index(e)
                out.append(len(stack) - 1 - i)
                del stack[i]
            else:
                out.append(None)
            stack.append(e)
    return out


def _histogram(distances: list[int | None]) -> dict[str, int]:
    buckets: dict[str, int] = {}
    for d in distances:
        if d is None:
            key = "first"
        elif d == 0:
            key = "0"
        else:
            low = 1 << int(math.log2(d))
            key = f"{low}-{2 * low - 1}" if low > 1 else "1"
        buckets[key] = buckets.get(key, 0) + 1
    return buckets


def sequence_stats(ids: np.ndarray, num_experts: int) -> dict[str, Any]:
    """The statistics of one layer's ``[S, T, k]`` sequence (module docstring)."""
    steps = step_experts(ids)
    distinct = [len(s) for s in steps]
    counts = np.bincount(ids.ravel(), minlength=num_experts)
    total = int(counts.sum())
    ranked = np.sort(counts)[::-1]
    needed = int(np.searchsorted(np.cumsum(ranked), 0.9 * total) + 1)
    p = counts[counts > 0] / total
    entropy = float(-(p * np.log2(p)).sum())
    windows = {}
    for w in WINDOWS:
        if w <= len(steps):
            sizes = [len(set().union(*steps[i : i + w])) for i in range(len(steps) - w + 1)]
            windows[str(w)] = float(np.mean(sizes))
    distances = reuse_distances(steps)
    seen = [d for d in distances if d is not None]
    return {
        "steps": len(steps),
        "tokens_per_step": int(ids.shape[1]),
        "distinct_per_step": {"min": min(distinct), "mean": float(np.mean(distinct)), "max": max(distinct)},
        "working_set": windows,
        "experts_for_90pct": needed,
        "entropy_bits": entropy,
        "entropy_of_max": entropy / math.log2(num_experts) if num_experts > 1 else 1.0,
        "experts_used": int((counts > 0).sum()),
        "pairs_per_expert": counts.tolist(),
        "reuse_distance": {
            "histogram": _histogram(distances),
            "median": float(np.median(seen)) if seen else None,
            "first_accesses": len(distances) - len(seen),
        },
    }
