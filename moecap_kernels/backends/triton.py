"""``triton``: fused grouped GEMM kernels over expert-sorted, block-padded rows (kernels/).

Per forward: one alignment (sort by expert, pad each expert to a multiple of BLOCK_M), one
gate/up launch for every expert with act(gate)·up fused, one down launch with the routing weight
and the combine fused (float atomics, or per-pair rows plus a fixed-order reduction when
``deterministic``). Shared experts run through the same two kernels as S extra experts that every
token is routed to with weight 1 (a second pair of launches, since their F may differ). No host
synchronisation anywhere in the forward.

Quantized experts (``weights.quantized``, every format but ``none``) are read as codes, scales and
zero points, and dequantized inside the kernels' K loop (``kernels/grouped_gemm.py``), the
activations staying in their dtype; ``w8a8`` quantizes x and each pair's act(gate)·up row to int8
per row first (``kernels/act_quant.py``) and runs int8 dot products. Refused: int4 group sizes
that are not multiples of 16 (a K step never straddles two groups, and a dot product's K is at
least 16), and w8a8 reductions long enough to overflow its int32 sums.

Options (attributes): ``count`` compiles in the kernels' own counters (padded rows, executed
FLOPs, issued weight bytes; see :meth:`read_kernel_counters`), ``deterministic`` picks the
reproducible combine, ``config`` forces launch parameters (else tuned file or heuristic; the last
one used is ``last_config``, whose ``source`` says which).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from moecap_kernels.backends import register
from moecap_kernels.backends.base import Backend, shared_as_routing
from moecap_kernels.dtypes import torch_dtype
from moecap_kernels.nvtx import nvtx_range
from moecap_kernels.quant.formats import FORMAT_NAMES, int8_max_reduction
from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import MoEWeights

COUNTER_FIELDS = ("padded_rows", "executed_flops", "issued_weight_bytes")
INT8_MAX_REDUCTION = int8_max_reduction()  # w8a8: K · 127² must fit the int32 sums


def _operands(x: torch.Tensor, weights: MoEWeights, spec: MoESpec) -> tuple[torch.Tensor, tuple, tuple]:
    """(activations, (w_in, w_out, shared w_in, shared w_out), expert biases) as the kernels take them:
    dense experts in the weights' dtype (x cast to it), or quantized ones with x and the biases in
    the activations' dtype."""
    biases = (weights.w_in_bias, weights.w_out_bias)
    if not spec.fmt.quantized:
        xw = x if x.dtype == weights.w_in.dtype else x.to(weights.w_in.dtype)
        return xw, (weights.w_in, weights.w_out, weights.shared_w_in, weights.shared_w_out), biases
    if weights.quantized is None:
        raise ValueError(f"{spec.weight_format} experts need weights.quantized (quant.layer.in_format)")
    q = weights.quantized
    biases = tuple(b if b is None or b.dtype == x.dtype else b.to(x.dtype) for b in biases)
    return x, (q.w_in, q.w_out, q.shared_w_in, q.shared_w_out), biases


@register("triton")
class TritonBackend(Backend):
    description = "Triton grouped GEMMs: fused gate/up+act, down with fused weighting and combine"
    weight_formats = FORMAT_NAMES
    graph_safe = True  # no host synchronisation in a forward (see the module docstring)

    def __init__(self, count: bool = False, deterministic: bool = False, config: Any = None) -> None:
        self.count = count
        self.deterministic = deterministic
        self.config = config  # a kernels.configs.KernelConfig, or None to choose per layer
        self.last_config: Any = None
        self._counters: torch.Tensor | None = None
        self._configs: dict[tuple, Any] = {}  # chosen per shape in prepare(), looked up per forward

    def availability(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "the triton backend needs the triton package (pip install triton)"
        if device.type == "cuda":
            return None
        from moecap_kernels.kernels.lazy_jit import interpreting

        if device.type != "cpu" or not interpreting():
            return "the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 to run (slowly) on the CPU"
        if dtype == torch.bfloat16:
            return (
                "the triton interpreter computes bfloat16 dot products wrongly (triton issue 11584); "
                "use float16 or float32 on the CPU"
            )
        return None

    def supports(self, spec: MoESpec) -> str | None:
        why = self.format_unsupported(spec)
        fmt = spec.fmt
        if why is None and fmt.codes == "uint4" and fmt.group_size % 16:
            why = (
                f"triton dequantizes int4 in K steps of 16 or more weights within one group: "
                f"{spec.weight_format}'s group of {fmt.group_size} is not a multiple of 16"
            )
        longest = max(spec.hidden_size, spec.intermediate_size, spec.shared_intermediate_size)
        if why is None and fmt.int8_activations and longest > INT8_MAX_REDUCTION:
            why = f"triton's w8a8 sums int8 products in int32: K = {longest} > {INT8_MAX_REDUCTION} overflows"
        return why

    # --- kernel counters -------------------------------------------------------------
    def _counter_buffer(self, device: torch.device) -> torch.Tensor:
        if self._counters is None or self._counters.device != device:
            self._counters = torch.zeros(3, dtype=torch.int64, device=device)
        return self._counters

    def reset_kernel_counters(self) -> None:
        """Zero the in-kernel counters (they accumulate over forwards until reset)."""
        if self._counters is not None:
            self._counters.zero_()

    def read_kernel_counters(self) -> dict[str, int | None]:
        """The counters summed since the last reset, with the BLOCK_M they were counted at (one host sync)."""
        values = [0, 0, 0] if self._counters is None else self._counters.tolist()
        block_m = None if self.last_config is None else self.last_config.block_m
        return {"block_m": block_m, **dict(zip(COUNTER_FIELDS, values, strict=True))}

    def kernel_counters(
        self,
        x: torch.Tensor,
        weights: MoEWeights,
        spec: MoESpec,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
    ) -> dict[str, int | None]:
        """One extra forward with the counting kernels compiled in; the timed ones stay uninstrumented."""
        counting = self.count
        self.count = True
        try:
            self.reset_kernel_counters()
            self.forward(x, weights, spec, topk_ids, topk_weights)
            return self.read_kernel_counters()
        finally:
            self.count = counting
            self.reset_kernel_counters()

    # --- forward -----------------------------------------------------------------------
    def prepare(self, weights: MoEWeights, spec: MoESpec, tokens: int) -> None:
        """Choose the launch config of ``tokens``-token forwards now, outside the timed region."""
        dtype = weights.w_in.dtype if not spec.fmt.quantized else torch_dtype(spec.act_dtype)
        self._choose_config(tokens, dtype, weights.w_in.device, spec)

    def _choose_config(self, tokens: int, dtype: torch.dtype, device: torch.device, spec: MoESpec) -> Any:
        """The forced config or the tuned/heuristic one, fitted to the weight format (BLOCK_K);
        chosen once per shape (a forward then only looks it up)."""
        from moecap_kernels.kernels.configs import for_format, get_config

        fmt = spec.fmt if spec.fmt.quantized else None
        if self.config is not None:
            return self.config if fmt is None else for_format(self.config, fmt)
        shape = (tokens, spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size)
        key = (*shape, dtype, device, spec.gated, spec.weight_format)
        if key not in self._configs:
            self._configs[key] = get_config(*shape, dtype, device, spec.gated, weight_format=fmt)
        return self._configs[key]

    def forward(
        self,
        x: torch.Tensor,
        weights: MoEWeights,
        spec: MoESpec,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
    ) -> torch.Tensor:
        from moecap_kernels.kernels.ops import fused_experts, moe_combine

        xw, (w_in, w_out, shared_in, shared_out), biases = _operands(x, weights, spec)
        config = self._choose_config(x.shape[0], xw.dtype, x.device, spec)
        self.last_config = config
        counters = self._counter_buffer(x.device) if self.count else None
        options = dict(
            gated=spec.gated,
            activation=spec.activation,
            atomic=not self.deterministic,
            counters=counters,
            swiglu_alpha=spec.swiglu_alpha,
            swiglu_limit=spec.swiglu_limit,
        )
        with nvtx_range("experts", x.device):
            routed = fused_experts(
                xw,
                w_in,
                w_out,
                topk_ids,
                topk_weights,
                config,
                biases=biases,
                weights_on_input=spec.weights_on_input,
                **options,
            )
            shared = None
            if spec.num_shared_experts:
                ids, gates = shared_as_routing(x, weights, spec)
                shared = fused_experts(xw, shared_in, shared_out, ids, gates, config, **options)
        with nvtx_range("combine", x.device):
            if self.deterministic:
                rows = routed.new_empty((0, routed.shape[1])) if shared is None else shared
                return moe_combine(routed, rows, spec.top_k, spec.num_shared_experts, x.dtype)
            y = routed if shared is None else routed + shared
            return y.to(x.dtype)
