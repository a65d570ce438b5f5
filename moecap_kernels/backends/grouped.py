"""``grouped``: routed pairs sorted by expert once, experts run on contiguous row segments.

One sort groups the pairs; on CUDA (bf16, Hopper and newer) ``torch._grouped_mm`` runs every
expert in one launch with no host sync; elsewhere each activated expert's segment is one GEMM
(the segment offsets need one host read; there is no loop over idle experts). The combine is
one weighted index-add.
"""

from __future__ import annotations

import torch

from moecap_kernels.backends import register
from moecap_kernels.backends.base import (
    Backend,
    ExpertMLP,
    activate,
    add_shared_experts,
    routed_mlp,
    weighted_expert,
)
from moecap_kernels.nvtx import nvtx_range
from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import MoEWeights


def _grouped_mm_usable(x: torch.Tensor, spec: MoESpec) -> bool:
    """torch._grouped_mm runs only where it was built to be fast: CUDA bf16 on sm90+; and here only
    for experts without biases whose weight applies to their output."""
    return (
        not (spec.expert_bias or spec.weights_on_input)
        and hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
    )


def grouped_experts(
    x: torch.Tensor,
    weights: MoEWeights,
    spec: MoESpec,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    mlp: ExpertMLP | None = None,
) -> torch.Tensor:
    """The routed experts only: Σ_j topk_weights[t, j] · expert_{topk_ids[t, j]}(x[t]), in x's dtype.

    ``mlp`` runs expert e on its rows in the per-segment path (default: ``routed_mlp``).
    """
    with nvtx_range("dispatch", x.device):
        flat_ids = topk_ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of_row = order // spec.top_k
        scale = topk_weights.reshape(-1)[order, None].to(x.dtype)
        counts = torch.zeros(spec.num_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
        ends = counts.cumsum(0)
    if _grouped_mm_usable(x, spec):
        with nvtx_range("experts", x.device):
            offs = ends.to(torch.int32)
            rows = x[token_of_row]
            h = activate(torch._grouped_mm(rows, weights.w_in.transpose(1, 2), offs=offs), spec)
            out = torch._grouped_mm(h, weights.w_out.transpose(1, 2), offs=offs)
        with nvtx_range("combine", x.device):
            return torch.zeros_like(x).index_add_(0, token_of_row, out * scale)
    # One segment per activated expert, gathered, computed and added back while it is in cache.
    y = torch.zeros_like(x)
    active = counts.nonzero().flatten()
    spans = torch.stack([active, ends[active] - counts[active], ends[active]], dim=1)
    mlp = mlp or routed_mlp(weights, spec)
    with nvtx_range("experts", x.device):
        for e, start, end in spans.tolist():  # one host read; activated experts only
            tokens = token_of_row[start:end]
            y.index_add_(0, tokens, weighted_expert(mlp, e, x[tokens], scale[start:end], spec))
    return y


@register("grouped")
class GroupedBackend(Backend):
    description = "pairs sorted by expert, one GEMM per activated expert segment (torch._grouped_mm on sm90)"

    def forward(
        self,
        x: torch.Tensor,
        weights: MoEWeights,
        spec: MoESpec,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
    ) -> torch.Tensor:
        y = grouped_experts(x, weights, spec, topk_ids, topk_weights)
        return add_shared_experts(y, x, weights, spec)
