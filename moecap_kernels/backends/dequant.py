"""``dequant``: quantized experts the naive way, each activated expert's matrices dequantized to
the activations' dtype (float32 arithmetic in torch), then the ``grouped`` GEMMs. It reads the
packed weights once and writes and reads a dense copy of every activated expert on every forward:
the baseline a fused dequantizing kernel is measured against.
"""

from __future__ import annotations

import torch

from moecap_kernels.backends import register
from moecap_kernels.backends.base import Backend, ExpertMLP, add_shared_experts, expert_mlp
from moecap_kernels.backends.grouped import grouped_experts
from moecap_kernels.quant.formats import FORMAT_NAMES
from moecap_kernels.quant.quantize import QuantizedMatrix
from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import MoEWeights


def dequantized_mlp(
    w_in: QuantizedMatrix,
    w_out: QuantizedMatrix,
    spec: MoESpec,
    dtype: torch.dtype,
    biases: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> ExpertMLP:
    """Expert i of the quantized pair on rows: dequantize both matrices to ``dtype``, then GEMMs."""
    b_in, b_out = biases

    def mlp(i: int, rows: torch.Tensor) -> torch.Tensor:
        dense_in = w_in.dequantize(i, dtype, compute=torch.float32)
        dense_out = w_out.dequantize(i, dtype, compute=torch.float32)
        bias_in, bias_out = (None, None) if b_in is None else (b_in[i], b_out[i])
        return expert_mlp(rows, dense_in, dense_out, spec, bias_in, bias_out)

    return mlp


def dequant_experts(
    x: torch.Tensor, weights: MoEWeights, spec: MoESpec, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Routed and shared experts, dequantized expert by expert (the activated ones only)."""
    q = weights.quantized
    routed = dequantized_mlp(q.w_in, q.w_out, spec, x.dtype, (weights.w_in_bias, weights.w_out_bias))
    y = grouped_experts(x, weights, spec, topk_ids, topk_weights, mlp=routed)
    return add_shared_experts(
        y, x, weights, spec, mlp=dequantized_mlp(q.shared_w_in, q.shared_w_out, spec, x.dtype)
    )


@register("dequant")
class DequantBackend(Backend):
    description = "quantized experts dequantized to the activations' dtype per forward, then grouped GEMMs"
    weight_formats = tuple(name for name in FORMAT_NAMES if name not in ("none", "w8a8"))

    def forward(
        self,
        x: torch.Tensor,
        weights: MoEWeights,
        spec: MoESpec,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
    ) -> torch.Tensor:
        return dequant_experts(x, weights, spec, topk_ids, topk_weights)
