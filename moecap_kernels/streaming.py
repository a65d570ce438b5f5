"""Buffers streamed through memory: how big, what they hold, and one read pass over them.

Two users: the calibration (read bandwidth) and the cache flush between timed repetitions. Sizes
are multiples of the last-level cache, bounded in bytes as well: a virtual machine can report its
host's whole L3 (a 2-core Intel guest reported 480 MiB), and a multiple of that would allocate,
fill and read gigabytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MIN_STREAM_BYTES = 64 * 2**20
MAX_STREAM_BYTES = 2**30  # one buffer
MAX_STREAM_TOTAL_BYTES = 2 * 2**30  # several buffers alive together


def stream_bytes(
    llc_bytes: int, multiple: int, *, available_bytes: int | None = None, buffers: int = 1
) -> int:
    """``multiple`` × LLC, within [64 MiB, 1 GiB], and ``buffers`` of them within 2 GiB and within
    1/4 of ``available_bytes`` (when given); a whole number of 4 KiB pages."""
    size = min(
        max(multiple * llc_bytes, MIN_STREAM_BYTES), MAX_STREAM_BYTES, MAX_STREAM_TOTAL_BYTES // buffers
    )
    if available_bytes is not None:
        size = min(size, max(available_bytes // (4 * buffers), 16 * 2**20))
    return max(size // 4096 * 4096, 4096)


def distinct_pages(nbytes: int, device: torch.device | str) -> torch.Tensor:
    """A float32 buffer of ``nbytes`` whose pages all hold different values.

    Never constant data: identical pages can be merged by the host (KSM) and then read from cache,
    which inflates a bandwidth. An arange is as good for that as random numbers and several times
    cheaper to make; its values are ordinary floats (no denormals to slow a sum down).
    """
    return torch.arange(nbytes // 4, dtype=torch.float32, device=device)


def read_pass(device: torch.device) -> Callable[[torch.Tensor], object]:
    """A function that reads every byte of a buffer once and writes nothing (beyond a scalar).

    On a CPU the extension's ``stream_read`` when built (several streams per core, as fast kernels
    read), else ``torch.sum``.
    """
    if device.type == "cpu":
        from moecap_kernels._ext import has_op

        if has_op("stream_read", "cpu"):
            return torch.ops.moecap.stream_read
    return torch.sum
