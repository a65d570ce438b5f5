"""moecap::stream_read (csrc/stream_read.cpp): it must read every byte, so its checksum is exact."""

from __future__ import annotations

import pytest
import torch

from moecap_kernels import _ext


@pytest.fixture(scope="module")
def stream_read():
    if not _ext.has_op("stream_read", "cpu"):
        pytest.skip(f"stream_read not available: {_ext.extension_status()}")
    return torch.ops.moecap.stream_read


@pytest.mark.parametrize("words", [0, 1, 7, 31, 32, 33, 1000, 4097, 1 << 20])
def test_checksum_is_the_wrapping_sum_of_all_words(stream_read, words):
    data = torch.randint(
        -(2**62), 2**62, (words,), dtype=torch.int64, generator=torch.Generator().manual_seed(words)
    )
    expected = sum(data.tolist()) % 2**64
    expected -= 2**64 if expected >= 2**63 else 0
    assert stream_read(data) == expected


def test_reads_float_buffers_by_their_bytes(stream_read):
    floats = torch.rand(4096)
    assert stream_read(floats) == stream_read(floats.view(torch.int64))
    with pytest.raises(RuntimeError, match="contiguous"):
        stream_read(torch.rand(64, 64).T)
