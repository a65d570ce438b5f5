"""``cpu_fused``: the experts of a MoE layer on a CPU, the fastest way this project has for each size.

Few tokens per expert (decode): the compiled ``moecap::moe_experts_cpu`` op (csrc/cpu_moe.cpp)
streams each activated expert's gate, up and down rows exactly once with all of that expert's
routed tokens batched, on all cores, close to the machine's streaming read bandwidth. Shared
experts go through the same op (each is an expert every token is routed to with weight 1).

Many tokens per expert (see ``FUSED_MAX_EXPERT_ROW_BYTES``): the work is bound by the GEMMs, and
those run on weights reordered once into oneDNN's blocked
layout (``torch.ops.mkldnn._reorder_linear_weight``), which spares oneDNN repacking every expert's
weights on every call. The packed copy costs one more copy of the expert weights, made on the first
forward that needs it. Where oneDNN cannot pack the dtype (float16 without AVX512-FP16) the plain
``grouped`` path runs. ``python benchmarks/cpu_kernel_bench.py`` times the op, the packed GEMMs and
the torch loop side by side; the threshold is their crossover on the 2-core CI machine.

Quantized experts (``weights.quantized``, every format of ``weight_formats``) always go through the
compiled ``moecap::moe_experts_cpu_q`` op (csrc/cpu_moe_quant.cpp), routed and shared alike, at any
token count: it dequantizes inside the streaming kernel, so codes and scales are read once and no
dequantized copy is made. x and the biases stay in the activations' dtype.
``python benchmarks/quant_kernel_bench.py`` times it per format against bf16 and a streaming read.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch

from moecap_kernels.backends import register
from moecap_kernels.backends.base import Backend, ExpertMLP, activate, add_shared_experts, shared_as_routing
from moecap_kernels.backends.grouped import grouped_experts
from moecap_kernels.quant.formats import int8_max_reduction
from moecap_kernels.quant.quantize import QuantizedMatrix
from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import MoEWeights

OP_NAME = "moe_experts_cpu"
QUANT_OP_NAME = "moe_experts_cpu_q"
# moe_experts_cpu_q's fmt codes, by (codes, zero points, int8 activations) of a WeightFormat
QUANT_FORMAT_CODES = {
    ("int8", False, False): 0,
    ("int8", False, True): 1,
    ("uint4", False, False): 2,
    ("uint4", True, False): 3,
    ("e4m3", False, False): 4,
    ("e2m1", False, False): 5,
}
# w8a8 sums int8 products in int32 (x biased to uint8 for vpdpbusd): exact while K · 255 · 127 < 2^31
W8A8_MAX_REDUCTION = int8_max_reduction(255)
# the op's codes; "gelu" is the erf form, as F.gelu; swiglu_oai is gpt-oss' clamped SwiGLU
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "swiglu_oai": 3}
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The op runs while an expert's routed activation rows — T·k / E rows on average, of max(H, F)
# elements — take at most this many bytes; beyond, GEMMs on packed weights are as fast or faster.
# Crossovers on the 2-core CI machine (commands and tables in
# benchmarks/results/cpu_kernel_bench-2026-11-29-crossovers.md): Mixtral-8x7B between 0.5 and 1
# rows of 28 KiB, Qwen3-30B-A3B and OLMoE-1B-7B between 4 and 8 rows of 4 KiB, DeepSeek-V2-Lite
# between 3 and 6 rows of 4 KiB.
FUSED_MAX_EXPERT_ROW_BYTES = 16 * 1024


def op_unavailable_reason(name: str = OP_NAME) -> str | None:
    """None when ``torch.ops.moecap.<name>`` (default the dense op) can run, else one line saying why not."""
    try:
        from moecap_kernels import _ext
    except ImportError as exc:
        return f"the extension loader is missing ({exc})"
    if _ext.has_op(name, "cpu"):
        return None
    return f"the compiled op moecap::{name} is not available ({_ext.extension_status()})"


def _fits(rows_times_experts: int, experts: int, intermediate: int, spec: MoESpec) -> bool:
    row_bytes = max(spec.hidden_size, intermediate) * spec.act_bytes_per_element
    return rows_times_experts * row_bytes <= FUSED_MAX_EXPERT_ROW_BYTES * experts


def use_fused(tokens: int, spec: MoESpec) -> bool:
    """Whether the routed experts of ``tokens`` tokens run faster through the op than through GEMMs."""
    return _fits(tokens * spec.top_k, spec.num_experts, spec.intermediate_size, spec)


def use_fused_shared(tokens: int, spec: MoESpec) -> bool:
    """The same for the shared experts, each of which every token is routed to."""
    return _fits(tokens, 1, spec.shared_intermediate_size, spec)


def fused_experts(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    spec: MoESpec,
    biases: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    weights_on_input: bool = False,
) -> torch.Tensor:
    """Σ_j weight[t, j] · expert_{ids[t, j]}(x[t]) through the op, in x's dtype (the weight on the
    expert's input when ``weights_on_input``; ``biases`` the experts' own, when they have them)."""
    return _op()(
        x.contiguous(),
        w_in,
        w_out,
        topk_ids.contiguous(),
        topk_weights.contiguous(),
        spec.gated,
        ACTIVATION_CODES[spec.activation],
        -1,
        *biases,
        spec.swiglu_alpha,
        spec.swiglu_limit,
        weights_on_input,
    )


def quantized_experts(
    x: torch.Tensor,
    w_in: QuantizedMatrix,
    w_out: QuantizedMatrix,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    spec: MoESpec,
    biases: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    weights_on_input: bool = False,
    max_isa: int = -1,
) -> torch.Tensor:
    """``fused_experts`` on quantized matrices (``moecap::moe_experts_cpu_q``), dequantized inside the
    kernel; x and the biases in the activations' dtype (biases cast to x's when they differ)."""
    fmt = w_in.fmt
    code = QUANT_FORMAT_CODES[(fmt.codes, fmt.zero_points, fmt.int8_activations)]
    b_in, b_out = (b if b is None or b.dtype == x.dtype else b.to(x.dtype) for b in biases)
    return _op(QUANT_OP_NAME)(
        x.contiguous(),
        w_in.codes.contiguous(),
        w_in.scales.contiguous(),
        None if w_in.zeros is None else w_in.zeros.contiguous(),
        w_out.codes.contiguous(),
        w_out.scales.contiguous(),
        None if w_out.zeros is None else w_out.zeros.contiguous(),
        topk_ids.contiguous(),
        topk_weights.contiguous(),
        code,
        fmt.group_size,
        fmt.block_rows,
        spec.gated,
        ACTIVATION_CODES[spec.activation],
        max_isa,
        b_in,
        b_out,
        spec.swiglu_alpha,
        spec.swiglu_limit,
        weights_on_input,
    )


@functools.cache
def _op(name: str = OP_NAME) -> Callable[..., torch.Tensor]:
    """An op's overload, looked up once (forwards run inside timed regions); raises if unavailable."""
    reason = op_unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"cpu_fused: {reason}")
    return getattr(torch.ops.moecap, name).default


# --- many tokens per expert: GEMMs on weights packed once for oneDNN -----------------------------
PACK_BATCH_HINT = 64  # the reorder asks for an expected batch; the packed weights serve any batch


@functools.cache
def packing_unavailable_reason(dtype: torch.dtype) -> str | None:
    """None when oneDNN can pack and multiply ``dtype`` weights on this CPU, else why not."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=dtype), PACK_BATCH_HINT)
        torch.ops.mkldnn._linear_pointwise(torch.ones(2, 16, dtype=dtype), packed, None, "none", [], "")
    except (AttributeError, RuntimeError) as exc:
        return f"oneDNN cannot pack {dtype} weights here ({str(exc).splitlines()[0][:120]})"
    return None


def _linear(rows: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")


class PackedExperts:
    """Every routed and shared expert's w_in and w_out, reordered once into oneDNN's layout
    (a copy: later in-place changes to the weights do not reach it; profiles never make any)."""

    def __init__(self, weights: MoEWeights) -> None:
        def pack(w: torch.Tensor) -> list[torch.Tensor]:
            return [torch.ops.mkldnn._reorder_linear_weight(m.contiguous(), PACK_BATCH_HINT) for m in w]

        self.routed = pack(weights.w_in), pack(weights.w_out)
        self.shared = pack(weights.shared_w_in), pack(weights.shared_w_out)
        self.routed_biases = weights.w_in_bias, weights.w_out_bias

    @staticmethod
    def mlp(
        pair: tuple[list[torch.Tensor], list[torch.Tensor]],
        spec: MoESpec,
        biases: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    ) -> ExpertMLP:
        """Expert i of ``pair`` (``routed`` or ``shared``) on rows, for ``grouped_experts`` and co."""
        w_in, w_out = pair
        b_in, b_out = biases
        if b_in is None:
            return lambda i, rows: _linear(activate(_linear(rows, w_in[i]), spec), w_out[i])
        return lambda i, rows: _linear(activate(_linear(rows, w_in[i], b_in[i]), spec), w_out[i], b_out[i])


# One packed copy per weights tensor (the on and off runs of a benchmark share it), dropped with it.
# Keyed by id: tensors compare elementwise, so they cannot be dictionary keys themselves.
_PACKED: dict[int, PackedExperts] = {}


def packed_experts(weights: MoEWeights) -> PackedExperts | None:
    """The packed copy of ``weights`` (made on first use), or None where oneDNN cannot pack them."""
    if packing_unavailable_reason(weights.w_in.dtype) is not None:
        return None
    key = id(weights.w_in)
    if key not in _PACKED:
        _PACKED[key] = PackedExperts(weights)
        weakref.finalize(weights.w_in, _PACKED.pop, key, None)
    return _PACKED[key]


def gemm_mlps(weights: MoEWeights, spec: MoESpec) -> tuple[ExpertMLP | None, ExpertMLP | None]:
    """(routed, shared) expert MLPs on packed weights; (None, None) where oneDNN cannot pack (plain GEMMs)."""
    packed = packed_experts(weights)
    if packed is None:
        return None, None
    return packed.mlp(packed.routed, spec, packed.routed_biases), packed.mlp(packed.shared, spec)


def gemm_experts(
    x: torch.Tensor,
    weights: MoEWeights,
    spec: MoESpec,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Routed and shared experts through per-expert GEMMs, on packed weights where oneDNN can."""
    routed, shared = gemm_mlps(weights, spec)
    y = grouped_experts(x, weights, spec, topk_ids, topk_weights, mlp=routed)
    return add_shared_experts(y, x, weights, spec, mlp=shared)


def uses_gemms(tokens: int, spec: MoESpec) -> bool:
    """Whether a forward of ``tokens`` tokens runs GEMMs (and so needs the packed copy)."""
    return not use_fused(tokens, spec) or (spec.num_shared_experts > 0 and not use_fused_shared(tokens, spec))


def _contiguous(weights: MoEWeights) -> bool:
    """The op reads weights in place and rejects strided ones (copying them would cost more)."""
    tensors = (weights.w_in, weights.w_out, weights.shared_w_in, weights.shared_w_out)
    biases = (weights.w_in_bias, weights.w_out_bias)
    return all(t.is_contiguous() for t in tensors) and all(b is None or b.is_contiguous() for b in biases)


@register("cpu_fused")
class CpuFusedBackend(Backend):
    description = (
        "CPU: a compiled kernel streaming each activated expert once (decode), GEMMs on oneDNN-packed weights"
    )
    weight_formats = (
        "none",
        "int8",
        "w8a8",
        "int4-gN",
        "int4-gN-zp",
        "fp8-tensor",
        "fp8-channel",
        "fp8-block",
        "mxfp4",
    )
    max_isa = -1  # the quantized op's code path cap (tests set 0..3; -1: the best this CPU runs)

    def supports(self, spec: MoESpec) -> str | None:
        why = self.format_unsupported(spec)
        longest = max(spec.hidden_size, spec.intermediate_size, spec.shared_intermediate_size)
        if why is None and spec.fmt.int8_activations and longest > W8A8_MAX_REDUCTION:
            why = (
                f"cpu_fused's w8a8 sums int8 products in int32: K = {longest} > {W8A8_MAX_REDUCTION} "
                "could overflow"
            )
        return why

    def extra_memory_bytes(self, spec: MoESpec, tokens: int) -> int:
        """The packed copy of the experts, made once GEMMs run (many tokens per expert; dense only)."""
        return spec.total_weight_bytes if not spec.fmt.quantized and uses_gemms(tokens, spec) else 0

    copies_weights = True  # GEMMs run on a packed copy of the experts

    def forget(self, weights: MoEWeights) -> None:
        _PACKED.pop(id(weights.w_in), None)

    def prepare(self, weights: MoEWeights, spec: MoESpec, tokens: int) -> None:
        """Packs the experts before timing when GEMMs will run (forward would, on first use)."""
        if spec.fmt.quantized:
            return
        if uses_gemms(tokens, spec) or not _contiguous(weights):
            packed_experts(weights)

    def availability(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if torch.device(device).type != "cpu":
            return "cpu_fused runs on a CPU only"
        if dtype not in SUPPORTED_DTYPES:
            return f"cpu_fused supports bfloat16, float16 and float32, not {dtype}"
        return op_unavailable_reason()

    def forward(
        self,
        x: torch.Tensor,
        weights: MoEWeights,
        spec: MoESpec,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
    ) -> torch.Tensor:
        if spec.fmt.quantized:
            return self._forward_quantized(x, weights, spec, topk_ids, topk_weights)
        tokens = x.shape[0]
        contiguous = _contiguous(weights)
        if not (use_fused(tokens, spec) and contiguous):
            return gemm_experts(x, weights, spec, topk_ids, topk_weights)
        biases = (weights.w_in_bias, weights.w_out_bias)
        y = fused_experts(
            x, weights.w_in, weights.w_out, topk_ids, topk_weights, spec, biases, spec.weights_on_input
        )
        if not spec.num_shared_experts:
            return y
        if not use_fused_shared(tokens, spec):
            return add_shared_experts(y, x, weights, spec, mlp=gemm_mlps(weights, spec)[1])
        ids, gates = shared_as_routing(x, weights, spec)
        y += fused_experts(x, weights.shared_w_in, weights.shared_w_out, ids, gates, spec)
        return y

    def _forward_quantized(
        self,
        x: torch.Tensor,
        weights: MoEWeights,
        spec: MoESpec,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
    ) -> torch.Tensor:
        """Routed and shared experts through the quantized op, at any token count."""
        q = weights.quantized
        if q is None:
            raise ValueError(f"{spec.weight_format} experts need weights.quantized (quant.layer.in_format)")
        biases = (weights.w_in_bias, weights.w_out_bias)
        y = quantized_experts(
            x, q.w_in, q.w_out, topk_ids, topk_weights, spec, biases, spec.weights_on_input, self.max_isa
        )
        if spec.num_shared_experts:
            ids, gates = shared_as_routing(x, weights, spec)
            y += quantized_experts(x, q.shared_w_in, q.shared_w_out, ids, gates, spec, max_isa=self.max_isa)
        return y
