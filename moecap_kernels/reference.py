"""Float64 reference of a layer's experts + combine, one expert at a time so memory stays bounded.

Written without the backends' helpers so an error in them cannot hide in the reference.
"""

from __future__ import annotations

import math

import torch

from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import MoEWeights


def _expert_f64(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, spec: MoESpec) -> torch.Tensor:
    h = x @ w_in.double().T
    f = w_out.shape[1]
    gate, up = (h[:, :f], h[:, f:]) if spec.gated else (h, None)
    if spec.activation == "silu":
        act = gate / (1.0 + torch.exp(-gate))
    else:
        act = 0.5 * gate * (1.0 + torch.erf(gate / math.sqrt(2.0)))
    inner = act * up if up is not None else act
    return inner @ w_out.double().T


def reference_forward(
    x: torch.Tensor, weights: MoEWeights, spec: MoESpec, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """y [T, H] in float64 for the given routing (ids and weights are inputs, not recomputed)."""
    x64 = x.double()
    y = torch.zeros_like(x64)
    for e in torch.unique(topk_ids).tolist():
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        out = _expert_f64(x64[token], weights.w_in[e], weights.w_out[e], spec)
        y.index_add_(0, token, out * topk_weights[token, slot, None].double())
    for s in range(spec.num_shared_experts):
        y += _expert_f64(x64, weights.shared_w_in[s], weights.shared_w_out[s], spec)
    return y


def relative_error(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    """‖y − y_ref‖ / ‖y_ref‖ in float64; NaN or inf anywhere in y gives inf."""
    diff = (y.double() - y_ref).norm().item()
    ref = y_ref.norm().item()
    if not math.isfinite(diff):
        return math.inf
    return diff / ref if ref > 0 else diff
