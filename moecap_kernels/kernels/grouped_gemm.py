"""The two grouped GEMM kernels of an MoE layer, over the expert-sorted layout of ``align.py``.

Both kernels run one program per (M-block, N-block) of a 1-D grid over *all* experts at once.
An M-block holds ``BLOCK_M`` consecutive rows of ``sorted_pair_ids`` that all belong to the
expert named by ``block_expert_ids``; padding rows hold the sentinel ``num_pairs`` and are masked
out of every load and store (they still occupy the tensor cores, which the counters report).
Programs whose block lies past ``num_padded`` return at once, so the grid can be sized from a
static bound without a host sync.

- ``gate_up_kernel``: ``h[row] = act(x[tok] @ W_gate[e]^T) * (x[tok] @ W_up[e]^T)`` (or
  ``act(x[tok] @ W_in[e]^T)`` when not gated), with ``tok = pair // TOP_K``; both tiles are
  accumulated in fp32 in the same K loop and fused in the epilogue; ``h`` is [max_padded, F].
  The epilogue scales both tiles by the pair's routing weight first when ``WEIGHTS_ON_INPUT``
  (Llama 4: the dot products are linear in the input), adds the expert's bias when ``HAS_BIAS``,
  then applies the activation: silu, gelu (erf), gelu (tanh) or gpt-oss' clamped SwiGLU
  ``(clamp(up, ±LIMIT) + 1) · g · σ(ALPHA · g)``, g = min(gate, LIMIT).
- ``down_kernel``: ``out = w_pair · (h[row] @ W_out[e]^T + b_out[e])`` in fp32 (the bias when
  ``HAS_BIAS``), either atomically added into ``out[tok]`` ([T, H], fast, order-dependent
  rounding) or stored to ``out[pair]`` ([T·k, H]) for a deterministic reduction afterwards
  (``combine.py``).

With ``COUNT`` on, each program adds to ``counters`` (int64 [3]): rows of its M-block without a
routed pair (gate/up kernel, N-block 0 only), the FLOPs its tiles executed (``2·BLOCK_M·K·n``
with n the in-bounds columns of its N tile and K the full reduction length), and the weight bytes
its loads requested (in-bounds elements × element size). With ``COUNT`` off none of that code is
compiled.

The kernels call only Triton builtins, never ``triton.language``'s own jitted helpers (``tl.cdiv``,
``tl.sigmoid``, ``tl.zeros``, ``tl.sum``): those are fixed as compiled or interpreted when triton
is first imported, while ``lazy_jit`` picks the mode at the first launch (see ``lazy_jit.py``).
"""

from __future__ import annotations

import triton.language as tl

from moecap_kernels.kernels.lazy_jit import lazy_jit

SILU = 0
GELU = 1
GELU_TANH = 2
SWIGLU_OAI = 3


@lazy_jit
def gate_up_kernel(
    x_ptr,
    w_ptr,
    h_ptr,
    pair_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    counters_ptr,
    bias_ptr,
    pair_weights_ptr,
    alpha,
    limit,
    num_pairs,
    hidden,
    inter,
    num_m_blocks,
    stride_xt,
    stride_xh,
    stride_we,
    stride_wf,
    stride_wh,
    stride_hm,
    stride_hf,
    stride_be,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    GATED: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WEIGHTS_ON_INPUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    COUNT: tl.constexpr,
):
    # Grouped launch order: GROUP_M M-blocks (mostly one expert) sweep N together, for L2 reuse.
    # Tile scheduling down to the early return: keep in sync with down_kernel (lazy_jit: no shared helper).
    pid = tl.program_id(0)
    num_n_blocks = (inter + BLOCK_N - 1) // BLOCK_N
    group_span = GROUP_M * num_n_blocks
    first_m = (pid // group_span) * GROUP_M
    group_rows = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % group_span) % group_rows
    pid_n = (pid % group_span) // group_rows

    num_padded = tl.load(num_padded_ptr)
    expert = tl.load(block_expert_ptr + pid_m)
    if (pid_m * BLOCK_M >= num_padded) | (expert < 0):
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ids_ptr + offs_m)
    row_ok = pair < num_pairs
    token = (pair // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xh
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    wg_ptrs = w_base + offs_k[:, None] * stride_wh + offs_n[None, :] * stride_wf
    wu_ptrs = wg_ptrs + inter * stride_wf  # up rows follow the gate rows (used when GATED)
    acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for kb in range(0, (hidden + BLOCK_K - 1) // BLOCK_K):
        k_ok = offs_k < hidden - kb * BLOCK_K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(wg_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_g = tl.dot(a, b, acc_g, input_precision=INPUT_PRECISION)
        if GATED:
            bu = tl.load(wu_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_u = tl.dot(a, bu, acc_u, input_precision=INPUT_PRECISION)
            wu_ptrs += BLOCK_K * stride_wh
        x_ptrs += BLOCK_K * stride_xh
        wg_ptrs += BLOCK_K * stride_wh

    if WEIGHTS_ON_INPUT:
        w_pair = tl.load(pair_weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
        acc_g = acc_g * w_pair[:, None]
        acc_u = acc_u * w_pair[:, None]
    if HAS_BIAS:
        b_base = bias_ptr + expert.to(tl.int64) * stride_be
        acc_g += tl.load(b_base + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_base + inter + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 0:
        act = acc_g / (1.0 + tl.exp(-acc_g))
    elif ACTIVATION == 1:
        act = 0.5 * acc_g * (1.0 + tl.math.erf(acc_g * 0.7071067811865476))
    elif ACTIVATION == 2:  # tanh(z) = 1 - 2 / (exp(2z) + 1)
        z = 0.7978845608028654 * (acc_g + 0.044715 * acc_g * acc_g * acc_g)
        act = 0.5 * acc_g * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))
    else:  # gpt-oss' clamped SwiGLU: up enters as (up + 1), clamped both ways; gate from above
        g = tl.minimum(acc_g, limit)
        act = g / (1.0 + tl.exp(-alpha * g)) * (tl.minimum(tl.maximum(acc_u, -limit), limit) + 1.0)
    if GATED and ACTIVATION != 3:
        act = act * acc_u
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_n[None, :] * stride_hf
    tl.store(h_ptrs, act.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    if COUNT:
        n_cols = tl.minimum(inter - pid_n * BLOCK_N, BLOCK_N).to(tl.int64)
        if GATED:
            n_cols = n_cols * 2  # gate and up tiles
        tl.atomic_add(counters_ptr + 1, n_cols * hidden * (2 * BLOCK_M), sem="relaxed")
        w_bytes = w_ptr.dtype.element_ty.primitive_bitwidth // 8
        tl.atomic_add(counters_ptr + 2, n_cols * hidden * w_bytes, sem="relaxed")
        if pid_n == 0:  # one +1 per padding row, to a single address
            ones = tl.full((BLOCK_M,), 1, tl.int64)
            tl.atomic_add(counters_ptr + offs_m * 0, ones, mask=pair >= num_pairs, sem="relaxed")


@lazy_jit
def down_kernel(
    h_ptr,
    w_ptr,
    out_ptr,
    pair_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    pair_weights_ptr,
    counters_ptr,
    bias_ptr,
    num_pairs,
    hidden,
    inter,
    num_m_blocks,
    stride_hm,
    stride_hf,
    stride_we,
    stride_wh,
    stride_wf,
    stride_om,
    stride_oh,
    stride_be,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ATOMIC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    COUNT: tl.constexpr,
):
    # Tile scheduling down to the early return: keep in sync with gate_up_kernel (lazy_jit: no shared helper).
    pid = tl.program_id(0)
    num_n_blocks = (hidden + BLOCK_N - 1) // BLOCK_N
    group_span = GROUP_M * num_n_blocks
    first_m = (pid // group_span) * GROUP_M
    group_rows = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % group_span) % group_rows
    pid_n = (pid % group_span) // group_rows

    num_padded = tl.load(num_padded_ptr)
    expert = tl.load(block_expert_ptr + pid_m)
    if (pid_m * BLOCK_M >= num_padded) | (expert < 0):
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ids_ptr + offs_m)
    row_ok = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)

    # Padding rows of h were never written: the row mask keeps them out of the loads.
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_k[None, :] * stride_hf
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    w_ptrs = w_base + offs_k[:, None] * stride_wf + offs_n[None, :] * stride_wh
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for kb in range(0, (inter + BLOCK_K - 1) // BLOCK_K):
        k_ok = offs_k < inter - kb * BLOCK_K
        a = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        h_ptrs += BLOCK_K * stride_hf
        w_ptrs += BLOCK_K * stride_wf

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_be + offs_n, mask=n_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    weight = tl.load(pair_weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    out_mask = row_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        token = (pair // TOP_K).to(tl.int64)
        out_ptrs = out_ptr + token[:, None] * stride_om + offs_n[None, :] * stride_oh
        tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")
    else:
        out_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_oh
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    if COUNT:
        n_cols = tl.minimum(hidden - pid_n * BLOCK_N, BLOCK_N).to(tl.int64)
        tl.atomic_add(counters_ptr + 1, n_cols * inter * (2 * BLOCK_M), sem="relaxed")
        w_bytes = w_ptr.dtype.element_ty.primitive_bitwidth // 8
        tl.atomic_add(counters_ptr + 2, n_cols * inter * w_bytes, sem="relaxed")
