"""A layer's experts put into its spec's weight format, once, before anything is timed."""

from __future__ import annotations

import dataclasses

from moecap_kernels.quant.quantize import QuantizedExperts, quantize_matrix
from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import MoEWeights


def quantize_experts(weights: MoEWeights, spec: MoESpec) -> QuantizedExperts:
    """The routed and shared experts of ``weights`` in ``spec.fmt`` (the router stays dense)."""
    fmt, h = spec.fmt, spec.hidden_size
    f, fs = spec.intermediate_size, max(spec.shared_intermediate_size, 1)
    return QuantizedExperts(
        w_in=quantize_matrix(weights.w_in, fmt, f),
        w_out=quantize_matrix(weights.w_out, fmt, h),
        shared_w_in=quantize_matrix(weights.shared_w_in, fmt, fs),
        shared_w_out=quantize_matrix(weights.shared_w_out, fmt, h),
    )


def in_format(weights: MoEWeights, spec: MoESpec) -> MoEWeights:
    """``weights`` carrying its experts in ``spec``'s weight format too (unchanged for ``none``);
    the dense tensors stay, for the references."""
    if not spec.fmt.quantized:
        return dataclasses.replace(weights, quantized=None)
    return dataclasses.replace(weights, quantized=quantize_experts(weights, spec))
