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
- ``moe_combine(Tensor routed, Tensor shared, int top_k, int num_shared, ScalarType out_dtype)
  -> Tensor``: the deterministic fixed-order sum of per-pair rows into y [T, H].

``config`` is :meth:`KernelConfig.as_list`. ``counters`` (int64 [3]) is only written when
``count`` is true. The FLOP formulas count useful work only, ``2·T·k·H·F_in`` and
``2·T·k·F·H``, whatever padding the kernels execute, so FlopCounterMode over a forward gives
``2·T·k·P_e`` (+ the shared experts' ``2·T·S·P_s``).
"""

from __future__ import annotations

import contextlib

import torch
import triton
from torch.utils.flop_counter import register_flop_formula

from moecap_kernels.kernels.align import align_tokens
from moecap_kernels.kernels.combine import combine_kernel
from moecap_kernels.kernels.configs import KernelConfig
from moecap_kernels.kernels.grouped_gemm import (
    GELU,
    GELU_TANH,
    SILU,
    SWIGLU_OAI,
    down_kernel,
    gate_up_kernel,
)

ACTIVATION_CODES = {"silu": SILU, "gelu": GELU, "gelu_tanh": GELU_TANH, "swiglu_oai": SWIGLU_OAI}
COMBINE_BLOCK_H = 256


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


def _intermediate_size(w_in: torch.Tensor, gated: bool) -> int:
    """F of ``w_in`` [E, F_in, H]: F_in holds the gate rows then the up rows when gated."""
    return w_in.shape[1] // (2 if gated else 1)


def _down_rows(topk_weights: torch.Tensor, atomic: bool) -> int:
    """Rows of the down output: T (combined atomically) or T·k (one per pair)."""
    num_tokens, top_k = topk_weights.shape
    return num_tokens if atomic else num_tokens * top_k


def _device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _check_bias(bias: torch.Tensor | None, experts: int, width: int, dtype: torch.dtype) -> None:
    if bias is not None and (
        tuple(bias.shape) != (experts, width) or bias.dtype != dtype or bias.stride(1) != 1
    ):
        raise ValueError(
            f"bias must be [{experts}, {width}] {dtype} with unit inner stride, got {bias.shape}"
        )


def _check_layout(sorted_pair_ids: torch.Tensor, block_expert_ids: torch.Tensor, block_m: int) -> None:
    if sorted_pair_ids.dtype != torch.int32 or block_expert_ids.dtype != torch.int32:
        raise ValueError("sorted_pair_ids and block_expert_ids must be int32")
    if sorted_pair_ids.numel() != block_expert_ids.numel() * block_m:
        raise ValueError(
            f"layout built for another block_m: {sorted_pair_ids.numel()} rows, "
            f"{block_expert_ids.numel()} blocks, block_m={block_m}"
        )


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
) -> None:
    """Fill the routed rows of ``h`` [max_padded, F] (padding rows are left as they were)."""
    block_m, block_n, *_ = config
    _check_layout(sorted_pair_ids, block_expert_ids, block_m)
    if x.dtype != w_in.dtype:
        raise ValueError(f"x ({x.dtype}) and w_in ({w_in.dtype}) must share a dtype")
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {sorted(ACTIVATION_CODES)}, got {activation!r}")
    hidden = x.shape[1]
    inter = _intermediate_size(w_in, gated)
    num_m_blocks = block_expert_ids.numel()
    if num_m_blocks == 0 or inter == 0:
        return
    _check_bias(b_in, w_in.shape[0], w_in.shape[1], x.dtype)
    pair_weights = None if input_weights is None else input_weights.reshape(-1).to(torch.float32).contiguous()
    grid = (num_m_blocks * triton.cdiv(inter, block_n),)
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
            GATED=gated,
            ACTIVATION=ACTIVATION_CODES[activation],
            HAS_BIAS=b_in is not None,
            WEIGHTS_ON_INPUT=pair_weights is not None,
            COUNT=count,
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
    inter = _intermediate_size(w_in, gated)
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
    return x.new_empty((sorted_pair_ids.shape[0], _intermediate_size(w_in, gated)))


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
) -> None:
    """Weighted down projection: atomically added into ``out`` [T, H] (fp32), or stored to its pair rows."""
    block_m, block_n, *_ = config
    _check_layout(sorted_pair_ids, block_expert_ids, block_m)
    if h.dtype != w_out.dtype:
        raise ValueError(f"h ({h.dtype}) and w_out ({w_out.dtype}) must share a dtype")
    if atomic and out.dtype != torch.float32:
        raise ValueError("the atomic combine accumulates into a float32 output")
    num_tokens, top_k = topk_weights.shape
    hidden, inter = w_out.shape[1], w_out.shape[2]
    num_m_blocks = block_expert_ids.numel()
    if num_m_blocks == 0 or hidden == 0:
        return
    _check_bias(b_out, w_out.shape[0], hidden, h.dtype)
    pair_weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    grid = (num_m_blocks * triton.cdiv(hidden, block_n),)
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
            ATOMIC=atomic,
            HAS_BIAS=b_out is not None,
            COUNT=count,
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


def fused_experts(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
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

    Returns fp32: y [T, H] when ``atomic``, else the weighted per-pair rows [T·k, H] for
    ``moe_combine``. ``counters`` (int64 [3]) switches the in-kernel counters on. ``biases``:
    the experts' own ([E, F_in], [E, H]); ``weights_on_input``: the routing weights scale each
    pair's input (Llama 4) and the down projection adds with weight 1.
    """
    num_experts = w_in.shape[0]
    routing = align_tokens(topk_ids, num_experts, config.block_m)
    count = counters is not None
    if counters is None:
        counters = torch.empty(3, dtype=torch.int64, device=x.device)  # never touched when not counting
    cfg = config.as_list()
    h = moe_gate_up(
        x,
        w_in,
        routing.sorted_pair_ids,
        routing.block_expert_ids,
        routing.num_padded,
        counters,
        topk_ids.shape[1],
        gated,
        activation,
        cfg,
        count,
        biases[0],
        topk_weights if weights_on_input else None,
        swiglu_alpha,
        swiglu_limit,
    )
    return moe_down(
        h,
        w_out,
        routing.sorted_pair_ids,
        routing.block_expert_ids,
        routing.num_padded,
        torch.ones_like(topk_weights) if weights_on_input else topk_weights,
        counters,
        cfg,
        atomic,
        count,
        biases[1],
    )
