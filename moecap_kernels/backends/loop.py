"""``loop``: the per-expert loop of Hugging Face Transformers' MoE blocks — the baseline users have.

For every expert hit by the batch: find its (token, slot) pairs with a one-hot mask, run the
expert on those rows, scale by the routing weight and index-add into the output.
"""

from __future__ import annotations

import torch

from moecap_kernels.backends import register
from moecap_kernels.backends.base import Backend, add_shared_experts, routed_mlp, weighted_expert
from moecap_kernels.nvtx import nvtx_range
from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import MoEWeights


@register("loop")
class LoopBackend(Backend):
    description = "per-expert Python loop over hit experts (Hugging Face Transformers style)"

    def forward(
        self,
        x: torch.Tensor,
        weights: MoEWeights,
        spec: MoESpec,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
    ) -> torch.Tensor:
        y = torch.zeros_like(x)
        with nvtx_range("dispatch", x.device):
            # mask[e, j, t] is True when token t's j-th choice is expert e.
            mask = torch.nn.functional.one_hot(topk_ids, spec.num_experts).permute(2, 1, 0)
            hit = (mask.sum(dim=(1, 2)) > 0).nonzero().flatten().tolist()
        mlp = routed_mlp(weights, spec)
        with nvtx_range("experts", x.device):
            for e in hit:
                slot, token = torch.where(mask[e])
                scale = topk_weights[token, slot, None].to(x.dtype)
                y.index_add_(0, token, weighted_expert(mlp, e, x[token], scale, spec))
            add_shared_experts(y, x, weights, spec)
        return y
