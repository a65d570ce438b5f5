"""Float64 reference of a layer's experts + combine, one expert at a time so memory stays bounded.

Written without the backends' helpers so an error in them cannot hide in the reference: every
feature of the spec (expert biases, activations, weights on the input, gated shared experts) is
spelled out here again, in float64.
"""

from __future__ import annotations

import math

import torch

from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import MoEWeights


def _act_f64(h: torch.Tensor, f: int, spec: MoESpec) -> torch.Tensor:
    gate, up = (h[:, :f], h[:, f:]) if spec.gated else (h, None)
    if spec.activation == "swiglu_oai":
        gate = torch.minimum(gate, torch.tensor(spec.swiglu_limit, dtype=h.dtype))
        up = torch.clamp(up, -spec.swiglu_limit, spec.swiglu_limit)
        return (up + 1.0) * gate / (1.0 + torch.exp(-spec.swiglu_alpha * gate))
    if spec.activation == "silu":
        act = gate / (1.0 + torch.exp(-gate))
    elif spec.activation == "gelu":
        act = 0.5 * gate * (1.0 + torch.erf(gate / math.sqrt(2.0)))
    else:  # gelu_tanh
        act = 0.5 * gate * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate**3)))
    return act * up if up is not None else act


def _expert_f64(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    spec: MoESpec,
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
) -> torch.Tensor:
    h = x @ w_in.double().T
    if b_in is not None:
        h = h + b_in.double()
    out = _act_f64(h, w_out.shape[1], spec) @ w_out.double().T
    return out + b_out.double() if b_out is not None else out


def reference_forward(
    x: torch.Tensor, weights: MoEWeights, spec: MoESpec, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """y [T, H] in float64 for the given routing (ids and weights are inputs, not recomputed)."""
    x64 = x.double()
    y = torch.zeros_like(x64)
    for e in torch.unique(topk_ids).tolist():
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        w = topk_weights[token, slot, None].double()
        biases = (weights.w_in_bias[e], weights.w_out_bias[e]) if spec.expert_bias else (None, None)
        rows = x64[token] * w if spec.weights_on_input else x64[token]
        out = _expert_f64(rows, weights.w_in[e], weights.w_out[e], spec, *biases)
        y.index_add_(0, token, out if spec.weights_on_input else out * w)
    for s in range(spec.num_shared_experts):
        out = _expert_f64(x64, weights.shared_w_in[s], weights.shared_w_out[s], spec)
        if spec.shared_expert_gate:
            out = out / (1.0 + torch.exp(-(x64 @ weights.shared_gate[s].double())))[:, None]
        y += out
    return y


def relative_error(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    """‖y − y_ref‖ / ‖y_ref‖ in float64; NaN or inf anywhere in y gives inf."""
    diff = (y.double() - y_ref).norm().item()
    ref = y_ref.norm().item()
    if not math.isfinite(diff):
        return math.inf
    return diff / ref if ref > 0 else diff
