"""The Triton launchers as torch.library custom ops, with fake impls and useful-FLOP formulas.

Ops (namespace ``moecap``):

- ``moe_gate_up(Tensor x, Tensor w_in, Tensor sorted_pair_ids, Tensor block_expert_ids,
  Tensor num_padded, Tensor(a!) counters, int top_k, bool gated, str activation, SymInt[] config,
  bool count, Tensor? b_in, Tensor? input_weights, float swiglu_alpha, float swiglu_limit)
  -> Tensor``: h [max_padded, F] in x's dtype (rows of padding left unwritten); ``b_in`` [E, F_in]
  the experts' biases, ``input_weights`` [T, k] routing weights that scale each pair's input.
- ``moe_down(Tensor h, Tensor w_out, Tensor sorted_pair_ids, Tensor block_expert_ids,
  Tensor num_padded, Tensor topk_weights, Tensor(a!) counters, SymInt[] config, bool atomic,
  bool count, Tensor? b_out) -> Tensor``: fp32, [T, H] combined with float atomics when
  ``atomic``, else the weighted per-pair rows [T·k, H]; ``b_out`` [E, H] the experts' biases.
- ``moe_gate_up_q(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, ..., str fmt, ...,
  Tensor? x_scales) -> Tensor`` and ``moe_down_q(Tensor h, Tensor codes, Tensor scales,
  Tensor? zeros, ..., str fmt, ..., Tensor? h_scales) -> Tensor``: the same with quantized
  experts (a ``QuantizedMatrix``'s codes, scales and zero points in format ``fmt``), dequantized
  in the kernels' K loop. For ``w8a8`` x (h) holds int8 codes with one float32 scale per row in
  ``x_scales`` (``h_scales``), and ``moe_gate_up_q`` returns h in float32, to be quantized next.
- ``quantize_rows(Tensor src, Tensor? sorted_pair_ids, int num_pairs) -> (Tensor, Tensor)``:
  int8 codes [R, W] and float32 scales [R] of each row (``act_quant.py``); with
  ``sorted_pair_ids``, padding rows get zero codes and scales without being read.
- ``moe_combine(Tensor routed, Tensor shared, int top_k, int num_shared, ScalarType out_dtype)
  -> Tensor``: the deterministic fixed-order sum of per-pair rows into y [T, H].

``config`` is :meth:`KernelConfig.as_list`. ``counters`` (int64 [3]) is only written when
``count`` is true. The FLOP formulas count useful work only, ``2·T·k·H·F_in`` and
``2·T·k·F·H``, whatever padding the kernels execute and whatever the weight format, so
FlopCounterMode over a forward gives ``2·T·k·P_e`` (+ the shared experts' ``2·T·S·P_s``).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
from torch.utils.flop_counter import register_flop_formula

from moecap_kernels.kernels.act_quant import quantize_rows_kernel
from moecap_kernels.kernels.align import align_tokens
from moecap_kernels.kernels.combine import combine_kernel
from moecap_kernels.kernels.configs import KernelConfig
from moecap_kernels.kernels.grouped_gemm import (
    CODE_KINDS,
    GELU,
    GELU_TANH,
    SILU,
    SWIGLU_OAI,
    down_kernel,
    gate_up_kernel,
)
from moecap_kernels.quant.formats import NONE, WeightFormat, int8_max_reduction, weight_format
from moecap_kernels.quant.quantize import QuantizedMatrix

ACTIVATION_CODES = {"silu": SILU, "gelu": GELU, "gelu_tanh": GELU_TANH, "swiglu_oai": SWIGLU_OAI}
COMBINE_BLOCK_H = 256
QUANT_ROWS_BLOCK = 1024
SCALE_TORCH = {"float32": torch.float32, "float16": torch.float16, "e8m0": torch.uint8}
# w8a8 accumulates int8 × int8 products in int32: exact while K · 127² < 2^31.
INT8_MAX_REDUCTION = int8_max_reduction()


def _input_precision(dtype: torch.dtype) -> str | None:
    """fp32 operands follow torch's matmul precision setting (exact unless TF32 is allowed)."""
    if dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _launch_kwargs(top_k: int, config: list[int], dtype: torch.dtype) -> dict:
    """The launch arguments that both grouped GEMM kernels take alike."""
    block_m, block_n, block_k, group_m, num_warps, num_stages = config
    return dict(
        TOP_K=top_k,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=group_m,
        INPUT_PRECISION=_input_precision(dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )


def _weight_args(
    fmt: WeightFormat,
    w: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    a: torch.Tensor,
    a_scales: torch.Tensor | None,
    shape: tuple[int, int, int, int],
    block_k: int,
) -> tuple[list, dict]:
    """Check a grouped GEMM's weights (dense or quantized) and activations against each other; the
    kernel arguments that say how they are stored: (scale, zero and activation-scale pointers then
    the five scale and zero-point strides; the format's constexprs).

    ``shape``: (experts, rows R, reduction K, rows per projection)."""
    experts, rows, cols, projection_rows = shape
    if not fmt.quantized:
        if a.dtype != w.dtype:
            raise ValueError(f"activations ({a.dtype}) and weights ({w.dtype}) must share a dtype")
        if scales is not None or zeros is not None or a_scales is not None:
            raise ValueError("dense weights take no scales, zero points or activation scales")
        consts = dict(CODES=0, GROUP=0, ROW_BLOCK=1, ZERO_POINTS=False, INT8_ACT=False)
        return [a, a, a, 0, 0, 0, 0, 0], consts
    codes_dtype = torch.int8 if fmt.codes == "int8" else torch.uint8
    if w.dtype != codes_dtype or tuple(w.shape) != (experts, rows, cols * fmt.weight_bits // 8):
        raise ValueError(
            f"{fmt.name} codes must be {codes_dtype} [{experts}, {rows}, {cols * fmt.weight_bits // 8}], "
            f"got {w.dtype} {list(w.shape)}"
        )
    groups = math.ceil(cols / fmt.group(cols))
    scale_shape = (experts, fmt.row_blocks(rows, projection_rows), groups)
    scale_dtype = SCALE_TORCH[fmt.scale_dtype]
    if scales is None or scales.dtype != scale_dtype or tuple(scales.shape) != scale_shape:
        got = None if scales is None else f"{scales.dtype} {list(scales.shape)}"
        raise ValueError(f"{fmt.name} scales must be {scale_dtype} {list(scale_shape)}, got {got}")
    if fmt.zero_points:
        zero_shape = (experts, rows, (groups + 1) // 2)
        if zeros is None or zeros.dtype != torch.uint8 or tuple(zeros.shape) != zero_shape:
            raise ValueError(f"{fmt.name} zero points must be uint8 {list(zero_shape)}")
    elif zeros is not None:
        raise ValueError(f"{fmt.name} has no zero points")
    if fmt.group_size and fmt.group_size % block_k:
        raise ValueError(f"{fmt.name}: BLOCK_K={block_k} must divide its group of {fmt.group_size}")
    if fmt.int8_activations:
        if a.dtype != torch.int8 or a_scales is None or a_scales.dtype != torch.float32:
            raise ValueError(f"{fmt.name} takes int8 activations with float32 scales per row")
        if cols > INT8_MAX_REDUCTION:
            raise ValueError(f"{fmt.name}: K={cols} overflows the int32 sums (K <= {INT8_MAX_REDUCTION})")
    elif not a.dtype.is_floating_point or a_scales is not None:
        raise ValueError(f"{fmt.name} takes floating-point activations without scales")
    z = a if zeros is None else zeros
    pointers = [scales, z, a if a_scales is None else a_scales]
    strides = [*scales.stride(), *((0, 0) if zeros is None else zeros.stride()[:2])]
    if zeros is not None and zeros.stride(2) != 1:
        raise ValueError("zero points need a unit stride along the groups")
    consts = dict(
        CODES=CODE_KINDS[fmt.codes],
        GROUP=fmt.group_size,
        ROW_BLOCK=fmt.block_rows,
        ZERO_POINTS=fmt.zero_points,
        INT8_ACT=fmt.int8_activations,
    )
    return pointers + strides, consts


def _in_rows(w_in: torch.Tensor, gated: bool) -> int:
    """F of ``w_in`` [E, F_in, ·]: F_in holds the gate rows then the up rows when gated."""
    return w_in.shape[1] // (2 if gated else 1)


def _down_rows(topk_weights: torch.Tensor, atomic: bool) -> int:
    """Rows of the down output: T (combined atomically) or T·k (one per pair)."""
    num_tokens, top_k = topk_weights.shape
    return num_tokens if atomic else num_tokens * top_k


def _device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _check_bias(bias: torch.Tensor | None, experts: int, width: int, activations: torch.dtype) -> None:
    """A bias [E, width] in the activations' dtype (any floating dtype beside int8 activations)."""
    if bias is None:
        return
    dtype_ok = bias.dtype == activations or (activations == torch.int8 and bias.dtype.is_floating_point)
    if tuple(bias.shape) != (experts, width) or not dtype_ok or bias.stride(1) != 1:
        raise ValueError(
            f"bias must be [{experts}, {width}] {activations} with unit inner stride, got "
            f"{bias.dtype} {list(bias.shape)}"
        )


def _check_layout(sorted_pair_ids: torch.Tensor, block_expert_ids: torch.Tensor, block_m: int) -> None:
    if sorted_pair_ids.dtype != torch.int32 or block_expert_ids.dtype != torch.int32:
        raise ValueError("sorted_pair_ids and block_expert_ids must be int32")
    if sorted_pair_ids.numel() != block_expert_ids.numel() * block_m:
        raise ValueError(
            f"layout built for another block_m: {sorted_pair_ids.numel()} rows, "
            f"{block_expert_ids.numel()} blocks, block_m={block_m}"
        )


def _h_dtype(x: torch.Tensor) -> torch.dtype:
    """h's dtype: x's, or float32 when x holds int8 codes (w8a8 quantizes h per row next)."""
    return x.dtype if x.dtype.is_floating_point else torch.float32


def launch_gate_up(
    x: torch.Tensor,
    w_in: torch.Tensor,
    h: torch.Tensor,
    sorted_pair_ids: torch.Tensor,
    block_expert_ids: torch.Tensor,
    num_padded: torch.Tensor,
    counters: torch.Tensor,
    top_k: int,
    gated: bool,
    activation: str,
    config: list[int],
    count: bool,
    b_in: torch.Tensor | None = None,
    input_weights: torch.Tensor | None = None,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    fmt: WeightFormat = NONE,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    x_scales: torch.Tensor | None = None,
) -> None:
    """Fill the routed rows of ``h`` [max_padded, F] (padding rows are left as they were).

    ``w_in``: dense [E, F_in, H] in x's dtype, or ``fmt``'s codes with ``scales`` (and ``zeros``);
    ``x_scales``: w8a8's per-token activation scales (x then holds int8 codes)."""
    block_m, block_n, block_k, *_ = config
    _check_layout(sorted_pair_ids, block_expert_ids, block_m)
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {sorted(ACTIVATION_CODES)}, got {activation!r}")
    hidden = x.shape[1]
    inter = _in_rows(w_in, gated)
    shape = (w_in.shape[0], w_in.shape[1], hidden, inter)
    quant_args, quant_consts = _weight_args(fmt, w_in, scales, zeros, x, x_scales, shape, block_k)
    num_m_blocks = block_expert_ids.numel()
    if num_m_blocks == 0 or inter == 0:
        return
    _check_bias(b_in, w_in.shape[0], w_in.shape[1], x.dtype)
    pair_weights = None if input_weights is None else input_weights.reshape(-1).to(torch.float32).contiguous()
    grid = (num_m_blocks * triton.cdiv(inter, block_n),)
    scale_ptr, zero_ptr, a_scale_ptr, *quant_strides = quant_args
    with _device_guard(x):
        gate_up_kernel[grid](
            x,
            w_in,
            h,
            sorted_pair_ids,
            block_expert_ids,
            num_padded,
            counters,
            x if b_in is None else b_in,  # never read without HAS_BIAS / WEIGHTS_ON_INPUT
            x if pair_weights is None else pair_weights,
            scale_ptr,
            zero_ptr,
            a_scale_ptr,
            float(swiglu_alpha),
            float(swiglu_limit),
            x.shape[0] * top_k,
            hidden,
            inter,
            num_m_blocks,
            x.stride(0),
            x.stride(1),
            w_in.stride(0),
            w_in.stride(1),
            w_in.stride(2),
            h.stride(0),
            h.stride(1),
            0 if b_in is None else b_in.stride(0),
            *quant_strides,
            GATED=gated,
            ACTIVATION=ACTIVATION_CODES[activation],
            HAS_BIAS=b_in is not None,
            WEIGHTS_ON_INPUT=pair_weights is not None,
            COUNT=count,
            **quant_consts,
            **_launch_kwargs(top_k, config, x.dtype),
        )


@torch.library.custom_op("moecap::moe_gate_up", mutates_args=("counters",))
def moe_gate_up(
    x: torch.Tensor,
    w_in: torch.Tensor,
    sorted_pair_ids: torch.Tensor,
    block_expert_ids: torch.Tensor,
    num_padded: torch.Tensor,
    counters: torch.Tensor,
    top_k: int,
    gated: bool,
    activation: str,
    config: list[int],
    count: bool,
    b_in: torch.Tensor | None = None,
    input_weights: torch.Tensor | None = None,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> torch.Tensor:
    inter = _in_rows(w_in, gated)
    h = torch.empty((sorted_pair_ids.numel(), inter), dtype=x.dtype, device=x.device)
    launch_gate_up(
        x,
        w_in,
        h,
        sorted_pair_ids,
        block_expert_ids,
        num_padded,
        counters,
        top_k,
        gated,
        activation,
        config,
        count,
        b_in,
        input_weights,
        swiglu_alpha,
        swiglu_limit,
    )
    return h


@moe_gate_up.register_fake
def _(x, w_in, sorted_pair_ids, block_expert_ids, num_padded, counters, top_k, gated, activation, config, *_):
    return x.new_empty((sorted_pair_ids.shape[0], _in_rows(w_in, gated)))


@torch.library.custom_op("moecap::moe_gate_up_q", mutates_args=("counters",))
def moe_gate_up_q(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    sorted_pair_ids: torch.Tensor,
    block_expert_ids: torch.Tensor,
    num_padded: torch.Tensor,
    counters: torch.Tensor,
    top_k: int,
    gated: bool,
    activation: str,
    fmt: str,
    config: list[int],
    count: bool,
    b_in: torch.Tensor | None = None,
    input_weights: torch.Tensor | None = None,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    x_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    h = torch.empty((sorted_pair_ids.numel(), _in_rows(codes, gated)), dtype=_h_dtype(x), device=x.device)
    launch_gate_up(
        x,
        codes,
        h,
        sorted_pair_ids,
        block_expert_ids,
        num_padded,
        counters,
        top_k,
        gated,
        activation,
        config,
        count,
        b_in,
        input_weights,
        swiglu_alpha,
        swiglu_limit,
        weight_format(fmt),
        scales,
        zeros,
        x_scales,
    )
    return h


@moe_gate_up_q.register_fake
def _(x, codes, scales, zeros, sorted_pair_ids, block_expert_ids, num_padded, counters, top_k, gated, *_):
    return x.new_empty((sorted_pair_ids.shape[0], _in_rows(codes, gated)), dtype=_h_dtype(x))


def launch_down(
    h: torch.Tensor,
    w_out: torch.Tensor,
    out: torch.Tensor,
    sorted_pair_ids: torch.Tensor,
    block_expert_ids: torch.Tensor,
    num_padded: torch.Tensor,
    topk_weights: torch.Tensor,
    counters: torch.Tensor,
    config: list[int],
    atomic: bool,
    count: bool,
    b_out: torch.Tensor | None = None,
    fmt: WeightFormat = NONE,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    h_scales: torch.Tensor | None = None,
) -> None:
    """Weighted down projection: atomically added into ``out`` [T, H] (fp32), or stored to its pair rows.

    ``w_out``: dense [E, H, F] in h's dtype, or ``fmt``'s codes with ``scales`` (and ``zeros``);
    ``h_scales``: w8a8's per-row activation scales (h then holds int8 codes)."""
    block_m, block_n, block_k, *_ = config
    _check_layout(sorted_pair_ids, block_expert_ids, block_m)
    if atomic and out.dtype != torch.float32:
        raise ValueError("the atomic combine accumulates into a float32 output")
    num_tokens, top_k = topk_weights.shape
    hidden, inter = w_out.shape[1], h.shape[1]
    shape = (w_out.shape[0], hidden, inter, hidden)
    quant_args, quant_consts = _weight_args(fmt, w_out, scales, zeros, h, h_scales, shape, block_k)
    num_m_blocks = block_expert_ids.numel()
    if num_m_blocks == 0 or hidden == 0:
        return
    _check_bias(b_out, w_out.shape[0], hidden, h.dtype)
    pair_weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    grid = (num_m_blocks * triton.cdiv(hidden, block_n),)
    scale_ptr, zero_ptr, a_scale_ptr, *quant_strides = quant_args
    with _device_guard(h):
        down_kernel[grid](
            h,
            w_out,
            out,
            sorted_pair_ids,
            block_expert_ids,
            num_padded,
            pair_weights,
            counters,
            h if b_out is None else b_out,  # never read without HAS_BIAS
            scale_ptr,
            zero_ptr,
            a_scale_ptr,
            num_tokens * top_k,
            hidden,
            inter,
            num_m_blocks,
            h.stride(0),
            h.stride(1),
            w_out.stride(0),
            w_out.stride(1),
            w_out.stride(2),
            out.stride(0),
            out.stride(1),
            0 if b_out is None else b_out.stride(0),
            *quant_strides,
            ATOMIC=atomic,
            HAS_BIAS=b_out is not None,
            COUNT=count,
            **quant_consts,
            **_launch_kwargs(top_k, config, h.dtype),
        )


@torch.library.custom_op("moecap::moe_down", mutates_args=("counters",))
def moe_down(
    h: torch.Tensor,
    w_out: torch.Tensor,
    sorted_pair_ids: torch.Tensor,
    block_expert_ids: torch.Tensor,
    num_padded: torch.Tensor,
    topk_weights: torch.Tensor,
    counters: torch.Tensor,
    config: list[int],
    atomic: bool,
    count: bool,
    b_out: torch.Tensor | None = None,
) -> torch.Tensor:
    alloc = torch.zeros if atomic else torch.empty
    out = alloc((_down_rows(topk_weights, atomic), w_out.shape[1]), dtype=torch.float32, device=h.device)
    launch_down(
        h,
        w_out,
        out,
        sorted_pair_ids,
        block_expert_ids,
        num_padded,
        topk_weights,
        counters,
        config,
        atomic,
        count,
        b_out,
    )
    return out


@moe_down.register_fake
def _(h, w_out, sorted_pair_ids, block_expert_ids, num_padded, topk_weights, counters, config, atomic, *_):
    return h.new_empty((_down_rows(topk_weights, atomic), w_out.shape[1]), dtype=torch.float32)


@torch.library.custom_op("moecap::moe_down_q", mutates_args=("counters",))
def moe_down_q(
    h: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    sorted_pair_ids: torch.Tensor,
    block_expert_ids: torch.Tensor,
    num_padded: torch.Tensor,
    topk_weights: torch.Tensor,
    counters: torch.Tensor,
    fmt: str,
    config: list[int],
    atomic: bool,
    count: bool,
    b_out: torch.Tensor | None = None,
    h_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    alloc = torch.zeros if atomic else torch.empty
    out = alloc((_down_rows(topk_weights, atomic), codes.shape[1]), dtype=torch.float32, device=h.device)
    launch_down(
        h,
        codes,
        out,
        sorted_pair_ids,
        block_expert_ids,
        num_padded,
        topk_weights,
        counters,
        config,
        atomic,
        count,
        b_out,
        weight_format(fmt),
        scales,
        zeros,
        h_scales,
    )
    return out


@moe_down_q.register_fake
def _(h, codes, scales, zeros, sorted_pair_ids, block_expert_ids, num_padded, topk_weights, counters, fmt,
      config, atomic, *_):  # fmt: skip
    return h.new_empty((_down_rows(topk_weights, atomic), codes.shape[1]), dtype=torch.float32)


def launch_quantize_rows(
    src: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    sorted_pair_ids: torch.Tensor | None = None,
    num_pairs: int = 0,
) -> None:
    """int8 ``codes`` [R, W] and float32 ``scales`` [R] of the rows of ``src`` [R, W] (w8a8)."""
    rows, width = src.shape
    if src.stride(1) != 1 or codes.stride(1) != 1:
        raise ValueError("quantize_rows needs rows with unit stride")
    if sorted_pair_ids is not None and sorted_pair_ids.numel() != rows:
        raise ValueError(f"{sorted_pair_ids.numel()} pair ids for {rows} rows")
    if rows == 0:
        return
    block = min(QUANT_ROWS_BLOCK, triton.next_power_of_2(max(width, 16)))
    with _device_guard(src):
        quantize_rows_kernel[(rows,)](
            src,
            codes,
            scales,
            src if sorted_pair_ids is None else sorted_pair_ids,  # never read without HAS_IDS
            num_pairs,
            width,
            src.stride(0),
            codes.stride(0),
            HAS_IDS=sorted_pair_ids is not None,
            BLOCK=block,
        )


@torch.library.custom_op("moecap::quantize_rows", mutates_args=())
def quantize_rows(
    src: torch.Tensor, sorted_pair_ids: torch.Tensor | None, num_pairs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.empty(src.shape, dtype=torch.int8, device=src.device)
    scales = torch.empty(src.shape[0], dtype=torch.float32, device=src.device)
    launch_quantize_rows(src.contiguous(), codes, scales, sorted_pair_ids, num_pairs)
    return codes, scales


@quantize_rows.register_fake
def _(src, sorted_pair_ids, num_pairs):
    return src.new_empty(src.shape, dtype=torch.int8), src.new_empty(src.shape[0], dtype=torch.float32)


def launch_combine(
    routed: torch.Tensor, shared: torch.Tensor, y: torch.Tensor, top_k: int, num_shared: int
) -> None:
    """y[t] = Σ_j routed[t·k + j] + Σ_s shared[t·S + s], in that order, cast to y's dtype."""
    num_tokens, hidden = y.shape
    if routed.stride(1) != 1 or y.stride(1) != 1 or (num_shared and shared.stride(1) != 1):
        raise ValueError("combine needs rows with unit stride along H")
    if num_tokens == 0 or hidden == 0:
        return
    shared = shared if num_shared else routed  # never read when num_shared == 0
    grid = (num_tokens, triton.cdiv(hidden, COMBINE_BLOCK_H))
    with _device_guard(routed):
        combine_kernel[grid](
            routed,
            shared,
            y,
            hidden,
            routed.stride(0),
            shared.stride(0),
            y.stride(0),
            TOP_K=top_k,
            NUM_SHARED=num_shared,
            BLOCK_H=COMBINE_BLOCK_H,
        )


@torch.library.custom_op("moecap::moe_combine", mutates_args=())
def moe_combine(
    routed: torch.Tensor, shared: torch.Tensor, top_k: int, num_shared: int, out_dtype: torch.dtype
) -> torch.Tensor:
    num_tokens = routed.shape[0] // top_k
    y = torch.empty((num_tokens, routed.shape[1]), dtype=out_dtype, device=routed.device)
    launch_combine(routed.contiguous(), shared.contiguous(), y, top_k, num_shared)
    return y


@moe_combine.register_fake
def _(routed, shared, top_k, num_shared, out_dtype):
    return routed.new_empty((routed.shape[0] // top_k, routed.shape[1]), dtype=out_dtype)


@register_flop_formula(torch.ops.moecap.moe_gate_up)
def _gate_up_flops(
    x,
    w_in,
    sorted_pair_ids,
    block_expert_ids,
    num_padded,
    counters,
    top_k,
    gated,
    activation,
    config,
    count,
    *_,
    out_shape=None,
) -> int:
    """Useful FLOPs: 2 per multiply-add of each routed pair's row (padding rows excluded)."""
    return 2 * x[0] * top_k * w_in[1] * w_in[2]


@register_flop_formula(torch.ops.moecap.moe_down)
def _down_flops(
    h,
    w_out,
    sorted_pair_ids,
    block_expert_ids,
    num_padded,
    topk_weights,
    counters,
    config,
    atomic,
    count,
    *_,
    out_shape=None,
) -> int:
    return 2 * topk_weights[0] * topk_weights[1] * w_out[1] * w_out[2]


@register_flop_formula(torch.ops.moecap.moe_gate_up_q)
def _gate_up_q_flops(x, codes, scales, zeros, sorted_pair_ids, block_expert_ids, num_padded, counters, top_k,
                     *_, out_shape=None) -> int:  # fmt: skip
    """The dense op's useful FLOPs: K is x's width (codes may pack two weights a byte)."""
    return 2 * x[0] * top_k * codes[1] * x[1]


@register_flop_formula(torch.ops.moecap.moe_down_q)
def _down_q_flops(h, codes, scales, zeros, sorted_pair_ids, block_expert_ids, num_padded, topk_weights,
                  *_, out_shape=None) -> int:  # fmt: skip
    return 2 * topk_weights[0] * topk_weights[1] * codes[1] * h[1]


def fused_experts(
    x: torch.Tensor,
    w_in: torch.Tensor | QuantizedMatrix,
    w_out: torch.Tensor | QuantizedMatrix,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    config: KernelConfig,
    *,
    gated: bool = True,
    activation: str = "silu",
    atomic: bool = True,
    counters: torch.Tensor | None = None,
    biases: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    weights_on_input: bool = False,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> torch.Tensor:
    """Experts ``w_in``/``w_out`` ([E, F_in, H], [E, H, F]) over a routing, without the final cast.

    The experts are dense tensors in x's dtype, or two ``QuantizedMatrix`` of one format, which
    the kernels dequantize as they go (``w8a8``: x and h are quantized to int8 per row first).
    Returns fp32: y [T, H] when ``atomic``, else the weighted per-pair rows [T·k, H] for
    ``moe_combine``. ``counters`` (int64 [3]) switches the in-kernel counters on. ``biases``:
    the experts' own ([E, F_in], [E, H]); ``weights_on_input``: the routing weights scale each
    pair's input (Llama 4) and the down projection adds with weight 1.
    """
    quantized = isinstance(w_in, QuantizedMatrix)
    if quantized != isinstance(w_out, QuantizedMatrix):
        raise ValueError("w_in and w_out must both be dense or both quantized")
    num_experts = w_in.shape[0] if not quantized else w_in.experts
    routing = align_tokens(topk_ids, num_experts, config.block_m)
    layout = (routing.sorted_pair_ids, routing.block_expert_ids, routing.num_padded)
    count = counters is not None
    if counters is None:
        counters = torch.empty(3, dtype=torch.int64, device=x.device)  # never touched when not counting
    cfg = config.as_list()
    top_k = topk_ids.shape[1]
    input_weights = topk_weights if weights_on_input else None
    down_weights = torch.ones_like(topk_weights) if weights_on_input else topk_weights
    swiglu = (swiglu_alpha, swiglu_limit)
    if not quantized:
        args = (counters, top_k, gated, activation, cfg, count, biases[0], input_weights, *swiglu)
        h = moe_gate_up(x, w_in, *layout, *args)
        return moe_down(h, w_out, *layout, down_weights, counters, cfg, atomic, count, biases[1])
    fmt = w_in.fmt
    if w_out.fmt != fmt:
        raise ValueError(f"w_in is {fmt.name} but w_out is {w_out.fmt.name}")
    x_scales = h_scales = None
    if fmt.int8_activations:
        x, x_scales = quantize_rows(x, None, 0)
    h = moe_gate_up_q(
        x, w_in.codes, w_in.scales, w_in.zeros, *layout, counters, top_k, gated, activation, fmt.name, cfg,
        count, biases[0], input_weights, *swiglu, x_scales,
    )  # fmt: skip
    if fmt.int8_activations:
        h, h_scales = quantize_rows(h, routing.sorted_pair_ids, topk_ids.numel())
    return moe_down_q(
        h, w_out.codes, w_out.scales, w_out.zeros, *layout, down_weights, counters, fmt.name, cfg, atomic,
        count, biases[1], h_scales,
    )  # fmt: skip
