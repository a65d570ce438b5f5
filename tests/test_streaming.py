"""Streamed buffers: sizes bounded in bytes as well as in LLC multiples; the cache flush only reads."""

from __future__ import annotations

import torch

from moecap_kernels.streaming import MAX_STREAM_BYTES, MIN_STREAM_BYTES, distinct_pages, stream_bytes
from moecap_kernels.timing import CacheFlusher

MiB = 2**20


def test_sizes_are_llc_multiples_within_byte_bounds() -> None:
    assert stream_bytes(32 * MiB, 8) == 256 * MiB
    assert stream_bytes(480 * MiB, 8) == MAX_STREAM_BYTES == 1024 * MiB  # a guest reporting a huge L3
    assert stream_bytes(480 * MiB, 16, buffers=3) * 3 <= 2 * 1024 * MiB  # several buffers: 2 GiB in all
    assert stream_bytes(1 * MiB, 8) == MIN_STREAM_BYTES
    assert stream_bytes(32 * MiB, 8, available_bytes=2**30, buffers=2) == 128 * MiB  # 1/4 of free memory
    assert stream_bytes(32 * MiB, 8, available_bytes=10**12) % 4096 == 0


def test_distinct_pages_differ_page_by_page() -> None:
    buf = distinct_pages(64 * 4096, "cpu")
    pages = buf.view(64, 1024)
    assert buf.dtype == torch.float32 and buf.numel() * 4 == 64 * 4096
    assert len({tuple(p[:4].tolist()) for p in pages}) == 64


def test_cache_flush_reads_a_bounded_buffer_and_writes_nothing() -> None:
    assert CacheFlusher(480 * MiB, torch.device("cpu")).nbytes == 960 * MiB
    assert CacheFlusher(1152 * MiB, torch.device("cpu")).nbytes == MAX_STREAM_BYTES  # not 2.25 GiB
    small = CacheFlusher(40 * MiB, torch.device("cpu"))
    assert small.nbytes == 80 * MiB
    before = small._buffer.clone()
    small()
    assert torch.equal(small._buffer, before)
