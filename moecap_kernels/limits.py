"""Bounds on every input, in one table: what the CLI, the config reader and the calibration accept.

Anything outside is bad input (one line, exit 2) or, for a cached file, a reason to ignore it. The
bounds are far beyond any real layer or device, yet low enough that no size overflows a float, no
seed overflows a generator and no loop runs for ever. Imports nothing, so the CLI can check its
arguments before it loads torch.
"""

from __future__ import annotations

# Layer shape (MoESpec). The largest real layers have H = 7168, F = 18432 (dense FFN), E = 512.
MAX_DIMENSION = 1 << 20  # hidden_size, intermediate_size, shared_intermediate_size
MAX_EXPERTS = 1 << 16  # num_experts (and so top_k)
MAX_SHARED_EXPERTS = 1 << 10

# One forward's tokens: decode batch, or prefill batch × seq_len; traces are bounded the same way.
MAX_TOKENS = 1 << 20

# Run length and reproducibility.
MAX_WARMUP = 1_000
MAX_REPS = 10_000
MAX_SEED = (1 << 32) - 1

# Peaks, in units per second: decimal bytes/s and FLOP/s. A figure outside is no device's.
PLAUSIBLE_BANDWIDTH = (1e6, 1e15)  # 1 MB/s .. 1 PB/s
PLAUSIBLE_FLOPS = (1e6, 1e18)  # 1 MFLOP/s .. 1 EFLOP/s

# Files read back: a calibration cache is a few hundred bytes; a config.json a few KiB.
MAX_SMALL_FILE_BYTES = 1 << 20


def implausible(label: str, value: float, bounds: tuple[float, float], unit: str) -> str | None:
    """None when ``bounds[0] <= value <= bounds[1]`` (and finite), else one line saying why not."""
    low, high = bounds
    if value == value and low <= value <= high:  # value == value is False for NaN
        return None
    return f"{label} {value:g} {unit} is implausible (expected {low:g} to {high:g} {unit})"
