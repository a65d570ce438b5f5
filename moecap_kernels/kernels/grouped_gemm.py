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

Quantized weights (``quant/formats.py``; the layouts ``quant/quantize.py`` writes). ``CODES``
says what ``w_ptr`` holds: ``DENSE`` weights in the activations' dtype, or ``INT8``, ``UINT4``,
``E4M3`` or ``E2M1`` codes, with ``scale_ptr`` [E, row blocks, groups] (and ``zero_ptr`` [E, R,
⌈groups / 2⌉] when ``ZERO_POINTS``). Each K step turns its tile of codes into their exact values
(integers, or e4m3 values decoded with integer bit operations, so that the interpreter and the
compiled kernel run the same code), in the activations' dtype, which holds every one of them
exactly, and takes the dot product of those with fp32 accumulation. Scales then multiply the fp32
result: once after the K loop for one scale per row (``GROUP`` 0, ``ROW_BLOCK`` 1) or per
projection (``ROW_BLOCK`` 0), or each K step's partial product for scales per ``GROUP`` weights
along K (``BLOCK_K`` must divide ``GROUP``, so a step never straddles two groups), per row
(``ROW_BLOCK`` 1) or per block of ``ROW_BLOCK`` rows counted within each projection. 4-bit tiles
are loaded as [BLOCK_N, BLOCK_K / 2] bytes and unpacked with ``join`` (byte j: element 2j low,
2j + 1 high). mxfp4's e8m0 scale 2^(s − 127) is built from its bits (s = 0, 2^-127, reads as 0;
the quantizer writes 1…254) and halved, since e2m1 codes enter the dot product as twice their
value (integers −12…12). ``INT8_ACT`` (w8a8): the activations are int8 codes too, with one fp32
scale per row at ``a_scale_ptr`` (per token for gate/up, per padded row for down); the dot
products are int8 × int8 → int32, and both scales multiply the result after the loop.

With ``COUNT`` on, each program adds to ``counters`` (int64 [3]): rows of its M-block without a
routed pair (gate/up kernel, N-block 0 only), the FLOPs its tiles executed (``2·BLOCK_M·K·n``
with n the in-bounds columns of its N tile and K the full reduction length), and the weight bytes
its loads requested: the in-bounds rows' weights or codes over the full K, plus every scale and
zero-point element each time it is loaded (once per program for per-row or per-projection
scales, once per K step for group-wise ones, each distinct row block once). With ``COUNT`` off
none of that code is compiled.

The kernels call only Triton builtins and the ``lazy_jit`` helpers below, never
``triton.language``'s own jitted helpers (``tl.cdiv``, ``tl.sigmoid``, ``tl.zeros``, ``tl.sum``):
those are fixed as compiled or interpreted when triton is first imported, while ``lazy_jit``
picks the mode at the first launch, for a kernel and its helpers alike (see ``lazy_jit.py``).
"""

from __future__ import annotations

import triton.language as tl

from moecap_kernels.kernels.lazy_jit import lazy_jit

SILU = 0
GELU = 1
GELU_TANH = 2
SWIGLU_OAI = 3

# What w_ptr holds (the CODES parameter); the names are WeightFormat.codes'.
DENSE = 0
INT8 = 1
UINT4 = 2
E4M3 = 3
E2M1 = 4
CODE_KINDS = {"dense": DENSE, "int8": INT8, "uint4": UINT4, "e4m3": E4M3, "e2m1": E2M1}


# --- device helpers (lazy_jit, so jitted in the kernels' mode) ------------------------------------
@lazy_jit
def _e4m3_values(bits):
    """e4m3 (fn) codes as int32 0…255 → their float32 values, exactly: e = 0 gives m·2^-9, else
    (1 + m/8)·2^(e − 7) built from the float32 bits (the code 0x7F, NaN, is never written)."""
    e = (bits >> 3) & 0xF
    m = bits & 0x7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    magnitude = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    return tl.where((bits & 0x80) != 0, -magnitude, magnitude)


@lazy_jit
def _e2m1_doubled(nibbles):
    """e2m1 codes as int32 0…15 → twice their value as int32 (−12…12): e = 0 gives m, else
    (2 + m)·2^(e − 1); bit 3 is the sign."""
    e = (nibbles >> 1) & 0x3
    m = nibbles & 0x1
    doubled = tl.where(e == 0, m, (m + 2) << (tl.maximum(e, 1) - 1))
    return tl.where((nibbles & 0x8) != 0, -doubled, doubled)


@lazy_jit
def _weight_tile_ptrs(w_rows, stride_wk, BLOCK_K: tl.constexpr, CODES: tl.constexpr):
    """Pointers to a K step's weight tile from the rows' start pointers ``w_rows`` [BLOCK_N]:
    [BLOCK_K, BLOCK_N] elements, or [BLOCK_N, BLOCK_K / 2] bytes for 4-bit codes."""
    if CODES == 2 or CODES == 4:
        ptrs = w_rows[:, None] + tl.arange(0, BLOCK_K // 2)[None, :] * stride_wk
    else:
        ptrs = w_rows[None, :] + tl.arange(0, BLOCK_K)[:, None] * stride_wk
    return ptrs


@lazy_jit
def _scale_ptrs(scale_base, offs_n, projection, projection_rows, stride_sr, ROW_BLOCK: tl.constexpr):
    """The scale row of each tile row (``ROW_BLOCK`` 1: its own; N: its block of N rows, blocks
    counted within the projection) as [BLOCK_N] pointers, or the projection's one scale
    (``ROW_BLOCK`` 0) as a single pointer."""
    if ROW_BLOCK == 0:
        ptrs = scale_base + projection * stride_sr
    else:
        blocks = (projection_rows + ROW_BLOCK - 1) // ROW_BLOCK
        ptrs = scale_base + (projection * blocks + offs_n // ROW_BLOCK) * stride_sr
    return ptrs


@lazy_jit
def _weight_dot(
    acc,
    a,
    w_ptrs,
    s_ptrs,
    z_ptrs,
    kb,
    k_len,
    n_ok,
    stride_sg,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CODES: tl.constexpr,
    GROUP: tl.constexpr,
    ZERO_POINTS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``acc`` plus ``a`` [BLOCK_M, BLOCK_K] times K step ``kb``'s weights [BLOCK_K, BLOCK_N]: the
    weights themselves, or the codes' exact values in a's dtype (4-bit: minus 8 or the zero point;
    e2m1: doubled), whose product is scaled here when the scales are per group along K."""
    k_left = k_len - kb * BLOCK_K
    if CODES == 2 or CODES == 4:
        offs_b = tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_b[None, :] < (k_left + 1) // 2), other=0)
        both = tl.join(packed & 0xF, packed >> 4)  # [BLOCK_N, BLOCK_K / 2, 2]: elements 2j, 2j + 1
        nibbles = tl.reshape(both, (BLOCK_N, BLOCK_K)).to(tl.int32)
        if CODES == 4:
            values = _e2m1_doubled(nibbles)
        elif ZERO_POINTS:
            group = kb * BLOCK_K // GROUP
            packed_zero = tl.load(z_ptrs + group // 2, mask=n_ok, other=0).to(tl.int32)
            values = nibbles - ((packed_zero >> ((group % 2) * 4)) & 0xF)[:, None]
        else:
            values = nibbles - 8
        b = tl.trans(values).to(a.dtype)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        b = tl.load(w_ptrs, mask=(offs_k < k_left)[:, None] & n_ok[None, :], other=0)
        if CODES == 3:
            b = _e4m3_values(b.to(tl.int32))
        b = b.to(a.dtype)
    if GROUP == 0:
        out = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        scale = tl.load(s_ptrs + (kb * BLOCK_K // GROUP) * stride_sg, mask=n_ok, other=0)
        if CODES == 4:  # e8m0 bits → 2^(s − 127), halved for the doubled e2m1 values
            scale = (scale.to(tl.int32) << 23).to(tl.float32, bitcast=True) * 0.5
        out = acc + tl.dot(a, b, input_precision=INPUT_PRECISION) * scale.to(tl.float32)[None, :]
    return out


@lazy_jit
def _row_scaled(acc, s_ptrs, n_ok, CODES: tl.constexpr, GROUP: tl.constexpr, ROW_BLOCK: tl.constexpr):
    """The accumulator in fp32, times its rows' (or its projection's) scales when the format has
    one scale per row or projection (group-wise scales were applied at each K step)."""
    out = acc.to(tl.float32)
    if CODES != 0 and GROUP == 0:
        if ROW_BLOCK == 0:
            out = out * tl.load(s_ptrs).to(tl.float32)
        else:
            out = out * tl.load(s_ptrs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return out


@lazy_jit
def _issued_weight_bytes(
    n_first,
    n_cols,
    k_len,
    W_BITS: tl.constexpr,
    SCALE_BYTES: tl.constexpr,
    CODES: tl.constexpr,
    GROUP: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
    ZERO_POINTS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The weight bytes one program requests for one projection's tile of ``n_cols`` (int64)
    in-bounds rows from row ``n_first``: codes over the full K, plus each scale and zero-point
    element every time it is loaded (see the module docstring)."""
    total = n_cols * k_len * W_BITS // 8
    if CODES != 0:
        if GROUP == 0:
            if ROW_BLOCK == 0:
                total += SCALE_BYTES
            else:
                total += n_cols * SCALE_BYTES
        else:
            steps = (k_len + BLOCK_K - 1) // BLOCK_K
            if ROW_BLOCK == 1:
                rows = n_cols
            else:
                rows = ((n_first + n_cols - 1) // ROW_BLOCK - n_first // ROW_BLOCK + 1).to(tl.int64)
            total += steps * rows * SCALE_BYTES
            if ZERO_POINTS:
                total += steps * n_cols
    return total


# --- kernels --------------------------------------------------------------------------------------
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
    scale_ptr,
    zero_ptr,
    a_scale_ptr,
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
    stride_se,
    stride_sr,
    stride_sg,
    stride_ze,
    stride_zr,
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
    CODES: tl.constexpr,
    GROUP: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
    ZERO_POINTS: tl.constexpr,
    INT8_ACT: tl.constexpr,
):
    # Grouped launch order: GROUP_M M-blocks (mostly one expert) sweep N together, for L2 reuse.
    # Tile scheduling down to the early return: keep in sync with down_kernel.
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
    # Gate rows 0..F-1 then up rows F..2F-1 (used when GATED); scales and zero points alike.
    w_rows = w_ptr + expert.to(tl.int64) * stride_we + offs_n * stride_wf
    wg_ptrs = _weight_tile_ptrs(w_rows, stride_wh, BLOCK_K, CODES)
    wu_ptrs = wg_ptrs + inter * stride_wf
    scale_base = scale_ptr + expert.to(tl.int64) * stride_se
    sg_ptrs = _scale_ptrs(scale_base, offs_n, 0, inter, stride_sr, ROW_BLOCK)
    su_ptrs = _scale_ptrs(scale_base, offs_n, 1, inter, stride_sr, ROW_BLOCK)
    zg_ptrs = zero_ptr + expert.to(tl.int64) * stride_ze + offs_n * stride_zr
    zu_ptrs = zg_ptrs + inter * stride_zr
    w_step = BLOCK_K // 2 * stride_wh if CODES == 2 or CODES == 4 else BLOCK_K * stride_wh
    if INT8_ACT:
        acc_g = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
        acc_u = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    else:
        acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for kb in range(0, (hidden + BLOCK_K - 1) // BLOCK_K):
        k_ok = offs_k < hidden - kb * BLOCK_K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc_g = _weight_dot(
            acc_g, a, wg_ptrs, sg_ptrs, zg_ptrs, kb, hidden, n_ok, stride_sg,
            BLOCK_K, BLOCK_N, CODES, GROUP, ZERO_POINTS, INPUT_PRECISION,
        )  # fmt: skip
        if GATED:
            acc_u = _weight_dot(
                acc_u, a, wu_ptrs, su_ptrs, zu_ptrs, kb, hidden, n_ok, stride_sg,
                BLOCK_K, BLOCK_N, CODES, GROUP, ZERO_POINTS, INPUT_PRECISION,
            )  # fmt: skip
            wu_ptrs += w_step
        x_ptrs += BLOCK_K * stride_xh
        wg_ptrs += w_step

    acc_g = _row_scaled(acc_g, sg_ptrs, n_ok, CODES, GROUP, ROW_BLOCK)
    acc_u = _row_scaled(acc_u, su_ptrs, n_ok, CODES, GROUP, ROW_BLOCK)
    if INT8_ACT:
        a_scale = tl.load(a_scale_ptr + token, mask=row_ok, other=0.0)
        acc_g = acc_g * a_scale[:, None]
        acc_u = acc_u * a_scale[:, None]
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
        w_bits = 4 if CODES == 2 or CODES == 4 else w_ptr.dtype.element_ty.primitive_bitwidth
        w_bytes = _issued_weight_bytes(
            pid_n * BLOCK_N, n_cols, hidden, w_bits, scale_ptr.dtype.element_ty.primitive_bitwidth // 8,
            CODES, GROUP, ROW_BLOCK, ZERO_POINTS, BLOCK_K,
        )  # fmt: skip
        if GATED:
            n_cols = n_cols * 2  # gate and up tiles
            w_bytes = w_bytes * 2
        tl.atomic_add(counters_ptr + 1, n_cols * hidden * (2 * BLOCK_M), sem="relaxed")
        tl.atomic_add(counters_ptr + 2, w_bytes, sem="relaxed")
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
    scale_ptr,
    zero_ptr,
    a_scale_ptr,
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
    stride_se,
    stride_sr,
    stride_sg,
    stride_ze,
    stride_zr,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ATOMIC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    COUNT: tl.constexpr,
    CODES: tl.constexpr,
    GROUP: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
    ZERO_POINTS: tl.constexpr,
    INT8_ACT: tl.constexpr,
):
    # Tile scheduling down to the early return: keep in sync with gate_up_kernel.
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
    w_rows = w_ptr + expert.to(tl.int64) * stride_we + offs_n * stride_wh
    w_ptrs = _weight_tile_ptrs(w_rows, stride_wf, BLOCK_K, CODES)
    s_ptrs = _scale_ptrs(scale_ptr + expert.to(tl.int64) * stride_se, offs_n, 0, hidden, stride_sr, ROW_BLOCK)
    z_ptrs = zero_ptr + expert.to(tl.int64) * stride_ze + offs_n * stride_zr
    w_step = BLOCK_K // 2 * stride_wf if CODES == 2 or CODES == 4 else BLOCK_K * stride_wf
    if INT8_ACT:
        acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for kb in range(0, (inter + BLOCK_K - 1) // BLOCK_K):
        k_ok = offs_k < inter - kb * BLOCK_K
        a = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _weight_dot(
            acc, a, w_ptrs, s_ptrs, z_ptrs, kb, inter, n_ok, stride_sg,
            BLOCK_K, BLOCK_N, CODES, GROUP, ZERO_POINTS, INPUT_PRECISION,
        )  # fmt: skip
        h_ptrs += BLOCK_K * stride_hf
        w_ptrs += w_step

    acc = _row_scaled(acc, s_ptrs, n_ok, CODES, GROUP, ROW_BLOCK)
    if INT8_ACT:
        acc = acc * tl.load(a_scale_ptr + offs_m, mask=row_ok, other=0.0)[:, None]
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
        w_bits = 4 if CODES == 2 or CODES == 4 else w_ptr.dtype.element_ty.primitive_bitwidth
        w_bytes = _issued_weight_bytes(
            pid_n * BLOCK_N, n_cols, inter, w_bits, scale_ptr.dtype.element_ty.primitive_bitwidth // 8,
            CODES, GROUP, ROW_BLOCK, ZERO_POINTS, BLOCK_K,
        )  # fmt: skip
        tl.atomic_add(counters_ptr + 1, n_cols * inter * (2 * BLOCK_M), sem="relaxed")
        tl.atomic_add(counters_ptr + 2, w_bytes, sem="relaxed")
