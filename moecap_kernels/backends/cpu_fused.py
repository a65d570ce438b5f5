"""``cpu_fused``: the experts of a MoE layer on a CPU through the compiled ``moecap::moe_experts_cpu`` op.

At decode a MoE layer is bound by reading the activated experts' weights. The op (csrc/cpu_moe.cpp)
streams each activated expert's gate, up and down rows exactly once with all of that expert's
routed tokens batched, on all cores, and reaches close to the machine's streaming read bandwidth.
Shared experts go through the same op (each is an expert every token is routed to with weight 1)
while T stays under the same threshold.

With many tokens per expert the work turns compute-bound (the op then computes 4 weight rows ×
up to 6 tokens per register tile) and, from about 16 routed pairs per expert, torch's GEMMs are as
fast or faster, so above ``FUSED_MAX_PAIRS_PER_EXPERT`` pairs per expert (T·k / E) the ``grouped``
path runs instead. Crossover measured on Mixtral-8x7B (8 experts, top-2) with
``python benchmarks/cpu_kernel_bench.py --models mixtral-8x7b`` on the 2-core CI machine: the op
beats the torch loop at 8 pairs per expert (T = 32) and loses at 16 (T = 64).
"""

from __future__ import annotations

import torch

from moecap_kernels.backends import register
from moecap_kernels.backends.base import Backend, add_shared_experts
from moecap_kernels.backends.grouped import grouped_experts
from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import MoEWeights

OP_NAME = "moe_experts_cpu"
ACTIVATION_CODES = {"silu": 0, "gelu": 1}  # the op's codes; "gelu" is the erf form, as F.gelu
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FUSED_MAX_PAIRS_PER_EXPERT = 12  # mean routed pairs per expert (T·k / E) up to which the op runs


def op_unavailable_reason() -> str | None:
    """None when ``torch.ops.moecap.moe_experts_cpu`` can run, else one line saying why not."""
    try:
        from moecap_kernels import _ext
    except ImportError as exc:
        return f"the extension loader is missing ({exc})"
    if _ext.has_op(OP_NAME, "cpu"):
        return None
    return f"the compiled op moecap::{OP_NAME} is not available ({_ext.extension_status()})"


def use_fused(tokens: int, spec: MoESpec) -> bool:
    """Whether ``tokens`` tokens are few enough per expert for the op to beat torch GEMMs."""
    return tokens * spec.top_k <= FUSED_MAX_PAIRS_PER_EXPERT * spec.num_experts


def fused_experts(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    spec: MoESpec,
) -> torch.Tensor:
    """Σ_j weight[t, j] · expert_{ids[t, j]}(x[t]) through the op, in x's dtype."""
    if not hasattr(torch.ops.moecap, OP_NAME):  # forward() without availability() first
        reason = op_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"cpu_fused: {reason}")
    return torch.ops.moecap.moe_experts_cpu(
        x.contiguous(),
        w_in,
        w_out,
        topk_ids.contiguous(),
        topk_weights.contiguous(),
        spec.gated,
        ACTIVATION_CODES[spec.activation],
    )


def _contiguous(weights: MoEWeights) -> bool:
    """The op reads weights in place and rejects strided ones (copying them would cost more)."""
    tensors = (weights.w_in, weights.w_out, weights.shared_w_in, weights.shared_w_out)
    return all(t.is_contiguous() for t in tensors)


@register("cpu_fused")
class CpuFusedBackend(Backend):
    description = "compiled CPU kernel: each activated expert's weights streamed once, all its tokens batched"

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
        tokens = x.shape[0]
        contiguous = _contiguous(weights)
        if use_fused(tokens, spec) and contiguous:
            y = fused_experts(x, weights.w_in, weights.w_out, topk_ids, topk_weights, spec)
        else:
            y = grouped_experts(x, weights, spec, topk_ids, topk_weights)
        if not spec.num_shared_experts:
            return y
        # Every token is routed to each shared expert: T pairs per shared expert.
        if tokens > FUSED_MAX_PAIRS_PER_EXPERT or not contiguous:
            return add_shared_experts(y, x, weights, spec)
        ids = torch.arange(spec.num_shared_experts, device=x.device).expand(tokens, -1)
        ones = torch.ones(ids.shape, dtype=torch.float32, device=x.device)
        y += fused_experts(x, weights.shared_w_in, weights.shared_w_out, ids, ones, spec)
        return y
