"""Float64 reference of a layer's experts + combine, one expert at a time so memory stays bounded.

Written without the backends' helpers so an error in them cannot hide in the reference: every
feature of the spec (expert biases, activations, weights on the input, gated shared experts) is
spelled out here again, in float64.

With quantized experts there are two references: the layer with the weights it was quantized
from (``dequantized=False``: what compression costs) and the layer with the dequantized weights
(``dequantized=True``: what a kernel itself gets wrong), where ``w8a8``'s activations are also
rounded to int8 per row as the format prescribes (scale = max |row| / 127 in float32, codes
rounded half to even and clamped to ±127), before each of the two projections.
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


def int8_rows(rows: torch.Tensor) -> torch.Tensor:
    """float64 rows as ``w8a8`` rounds them: per row, scale max |row| / 127 (float32), codes
    rounded half to even and clamped to ±127, times the scale again (an all-zero row stays 0)."""
    amax = rows.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).double()
    return torch.round(rows / scale).clamp(-127, 127) * scale


def _expert_f64(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    spec: MoESpec,
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
    int8_activations: bool = False,
) -> torch.Tensor:
    quantize = int8_rows if int8_activations else (lambda rows: rows)
    h = quantize(x) @ w_in.double().T
    if b_in is not None:
        h = h + b_in.double()
    out = quantize(_act_f64(h, w_out.shape[1], spec)) @ w_out.double().T
    return out + b_out.double() if b_out is not None else out


def _matrices(weights: MoEWeights, spec: MoESpec, dequantized: bool):
    """(routed expert e → (w_in, w_out), shared expert s → (w_in, w_out)): the dense weights, or the
    quantized ones dequantized in float64, one expert at a time."""
    q = weights.quantized if dequantized and spec.fmt.quantized else None
    if q is None:
        return (lambda e: (weights.w_in[e], weights.w_out[e])), (
            lambda s: (weights.shared_w_in[s], weights.shared_w_out[s])
        )
    f64 = torch.float64
    return (lambda e: (q.w_in.dequantize(e, f64), q.w_out.dequantize(e, f64))), (
        lambda s: (q.shared_w_in.dequantize(s, f64), q.shared_w_out.dequantize(s, f64))
    )


def reference_forward(
    x: torch.Tensor,
    weights: MoEWeights,
    spec: MoESpec,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    dequantized: bool = False,
) -> torch.Tensor:
    """y [T, H] in float64 for the given routing (ids and weights are inputs, not recomputed);
    ``dequantized``: with the quantized experts' own values (see the module's docstring)."""
    x64 = x.double()
    y = torch.zeros_like(x64)
    routed, shared = _matrices(weights, spec, dequantized)
    int8 = dequantized and spec.fmt.int8_activations
    for e in torch.unique(topk_ids).tolist():
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        w = topk_weights[token, slot, None].double()
        biases = (weights.w_in_bias[e], weights.w_out_bias[e]) if spec.expert_bias else (None, None)
        rows = x64[token] * w if spec.weights_on_input else x64[token]
        out = _expert_f64(rows, *routed(e), spec, *biases, int8_activations=int8)
        y.index_add_(0, token, out if spec.weights_on_input else out * w)
    for s in range(spec.num_shared_experts):
        out = _expert_f64(x64, *shared(s), spec, int8_activations=int8)
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
