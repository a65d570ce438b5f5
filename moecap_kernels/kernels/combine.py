"""Deterministic combine: y[t] = Σ_j routed[t·k + j] + Σ_s shared[t·S + s], summed in that fixed order.

The per-pair rows come from the down kernel's non-atomic mode (already scaled by their routing
weights, fp32). Summing them here in a fixed order, instead of with float atomics, makes the
output bitwise reproducible run to run; the cast to the output dtype is fused.
"""

from __future__ import annotations

import triton.language as tl

from moecap_kernels.kernels.lazy_jit import lazy_jit


@lazy_jit
def combine_kernel(
    routed_ptr,
    shared_ptr,
    y_ptr,
    hidden,
    stride_rm,
    stride_sm,
    stride_ym,
    TOP_K: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < hidden
    acc = tl.full((BLOCK_H,), 0.0, tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(routed_ptr + (token * TOP_K + j) * stride_rm + offs, mask=ok, other=0.0)
    for s in tl.static_range(NUM_SHARED):
        acc += tl.load(shared_ptr + (token * NUM_SHARED + s) * stride_sm + offs, mask=ok, other=0.0)
    tl.store(y_ptr + token * stride_ym + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)
