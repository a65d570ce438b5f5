"""The csrc/ CUDA kernels compiled at run time by NVRTC through CuPy's ``RawModule``: the routing
counter and the token alignment on a GPU machine where the torch extension cannot be built (no nvcc,
or a toolkit that does not match torch's). Same kernels (``csrc/*_kernels.cuh``, which the extension
includes too), same launch geometry as the C++ launchers (``csrc/*_cuda.cu``), same results; launched
on torch's current stream of the tensors' device, never synchronising the host.

Used by ``counters.CountAccumulator`` and ``kernels.align.align_tokens`` when the extension has no
CUDA build and CuPy is installed (``pip install cupy-cuda12x`` or ``cupy-cuda13x``);
``status()`` says which path a machine takes.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from functools import cache
from typing import Any

import torch

from moecap_kernels._ext import CSRC_DIR

COUNT_THREADS = 1024
ALIGN_THREADS, SCAN_THREADS = 256, 1024
DEFAULT_SHARED_BYTES = 48 * 1024
MAX_FILL_BLOCKS = 4096
# csrc/align_cuda.h
ALIGN_CHUNK_PAIRS, ALIGN_MAX_CHUNKS, ALIGN_CHUNK_GRANULE = 4096, 1024, 256
MAX_EXPERTS = 1 << 16
NAMES = {
    "count": "moecap::counts::count_routing_kernel",
    "histogram64": "moecap::align::chunk_histogram_kernel<long long>",
    "histogram32": "moecap::align::chunk_histogram_kernel<int>",
    "scan": "moecap::align::scan_kernel",
    "scatter64": "moecap::align::scatter_kernel<long long>",
    "scatter32": "moecap::align::scatter_kernel<int>",
}


@cache
def available() -> bool:
    """Whether CuPy is installed and sees a GPU (asked once: a forward asks it)."""
    if importlib.util.find_spec("cupy") is None or not torch.cuda.is_available():
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # a CuPy built for another CUDA: unusable, said by status()
        return False


def source() -> str:
    """The two kernel headers as one NVRTC translation unit."""
    parts = [(CSRC_DIR / name).read_text() for name in ("counts_kernels.cuh", "align_kernels.cuh")]
    return "\n".join(part.replace("#pragma once", "") for part in parts)


@cache
def _module(device_index: int) -> Any:
    import cupy

    with cupy.cuda.Device(device_index):
        options = ("--std=c++17", f"-I{CSRC_DIR}")  # the headers include device_types.cuh
        module = cupy.RawModule(code=source(), options=options, name_expressions=tuple(NAMES.values()))
        module.compile()
        return module


def _kernel(device: torch.device, key: str) -> Any:
    return _module(device.index if device.index is not None else torch.cuda.current_device()).get_function(
        NAMES[key]
    )


def status() -> str:
    """One line: whether the CuPy path can run here, and why not."""
    if importlib.util.find_spec("cupy") is None:
        return "CuPy not installed"
    if not available():
        return "CuPy sees no GPU"
    try:
        _module(torch.cuda.current_device())
    except Exception as exc:  # NVRTC errors: the reason is the finding
        return f"CuPy NVRTC compile failed ({str(exc).splitlines()[0][:120]})"
    return "csrc kernels compiled by NVRTC (CuPy)"


@contextlib.contextmanager
def _on_torch_stream(device: torch.device) -> Iterator[None]:
    """CuPy launches on torch's current stream of ``device`` (events and graphs see them there)."""
    import cupy

    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(stream.device_index), cupy.cuda.ExternalStream(stream.cuda_stream):
        yield


def _array(t: torch.Tensor) -> Any:
    import cupy

    return cupy.asarray(t)  # zero-copy, through __cuda_array_interface__


def _opt_in(kernel: Any, shared_bytes: int) -> None:
    if shared_bytes > DEFAULT_SHARED_BYTES:
        kernel.max_dynamic_shared_size_bytes = shared_bytes


def count_routing(
    topk_ids: torch.Tensor,
    stats: torch.Tensor,
    num_experts: int,
    expert_weight_bytes: int,
    flops_per_pair: int,
) -> None:
    """``moecap::count_routing`` on CUDA (csrc/counts.cpp's contract): adds one forward's routing
    to ``stats`` int64 [E + 6]. One block of 1024 threads, a shared histogram of E + 1 bins."""
    import numpy as np

    if not 0 < num_experts <= MAX_EXPERTS:
        raise ValueError(f"count_routing: num_experts must be in [1, {MAX_EXPERTS}], got {num_experts}")
    ids = topk_ids.reshape(-1).to(torch.int64).contiguous()
    kernel = _kernel(stats.device, "count")
    shared = (num_experts + 1) * 4
    _opt_in(kernel, shared)
    args = (_array(ids), np.int64(ids.numel()), np.int64(num_experts), np.int64(expert_weight_bytes),
            np.int64(flops_per_pair), _array(stats))  # fmt: skip
    with _on_torch_stream(stats.device):
        kernel((1,), (COUNT_THREADS,), args, shared_mem=shared)


def chunk_pairs(n_pairs: int) -> int:
    """Pairs per chunk (csrc/align_cuda.h ``align_chunk_pairs``)."""
    spread = -(-n_pairs // ALIGN_MAX_CHUNKS)
    rounded = -(-spread // ALIGN_CHUNK_GRANULE) * ALIGN_CHUNK_GRANULE
    return max(rounded, ALIGN_CHUNK_PAIRS)


def grid_size(num_chunks: int, items: int) -> int:
    """Blocks for a kernel over ``num_chunks`` chunks that grid-strides over ``items`` items."""
    return max(num_chunks, min(-(-items // ALIGN_THREADS), MAX_FILL_BLOCKS))


def align_tokens(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``moecap::align_tokens`` on CUDA (the contract of ``kernels/align.py``): three kernels."""
    import numpy as np

    from moecap_kernels.kernels.align import max_padded_rows

    if not 0 < num_experts <= MAX_EXPERTS or block_m <= 0:
        raise ValueError(f"align_tokens: bad num_experts={num_experts} or block_m={block_m}")
    device = topk_ids.device
    ids = topk_ids.reshape(-1)
    ids = ids if ids.dtype in (torch.int32, torch.int64) else ids.to(torch.int64)
    ids = ids.contiguous()
    n_pairs = ids.numel()
    max_padded = max_padded_rows(n_pairs, num_experts, block_m)
    max_blocks = max_padded // block_m
    per_chunk = chunk_pairs(n_pairs)
    num_chunks = -(-n_pairs // per_chunk)
    workspace = torch.empty((num_chunks + 2) * num_experts, dtype=torch.int32, device=device)
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_ids = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    counts = workspace[: num_chunks * num_experts]
    start = workspace[num_chunks * num_experts : (num_chunks + 1) * num_experts]
    end = workspace[(num_chunks + 1) * num_experts :]
    width = "64" if ids.dtype == torch.int64 else "32"
    histogram, scan, scatter = (_kernel(device, k) for k in (f"histogram{width}", "scan", f"scatter{width}"))
    shared = num_experts * 4
    for kernel in (histogram, scatter):
        _opt_in(kernel, shared)
    i64 = np.int64
    common = (_array(ids), i64(n_pairs), i64(num_experts), i64(per_chunk), i64(num_chunks), _array(counts))
    with _on_torch_stream(device):
        grid = grid_size(num_chunks, max_padded)
        if grid:
            args = (*common, _array(sorted_ids), i64(max_padded))
            histogram((grid,), (ALIGN_THREADS,), args, shared_mem=shared)
        args = (_array(counts), i64(num_chunks), i64(num_experts), i64(block_m), _array(start), _array(end),
                _array(num_padded))  # fmt: skip
        scan((1,), (SCAN_THREADS,), args)
        grid = grid_size(num_chunks, max_blocks)
        if grid:
            args = (*common, _array(start), _array(end), _array(num_padded), i64(block_m), i64(max_blocks),
                    _array(sorted_ids), _array(block_ids))  # fmt: skip
            scatter((grid,), (ALIGN_THREADS,), args, shared_mem=shared)
    return sorted_ids, block_ids, num_padded
