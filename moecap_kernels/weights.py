"""MoEWeights: the tensors of one MoE layer, laid out as nn.Linear does (out × in), experts stacked.

- ``router``:        [E, H]
- ``w_in``:          [E, F_in, H], F_in = 2F when gated (rows 0..F-1 gate, F..2F-1 up), else F
- ``w_out``:         [E, H, F]
- ``shared_w_in``:   [S, F_in_s, H] and ``shared_w_out``: [S, H, F_s] (S may be 0)

and, where the spec has them (else None):

- ``router_bias``:   [E], added to the logits;
- ``selection_bias``: [E] float32, added to the scores for choosing experts only;
- ``w_in_bias``:     [E, F_in] and ``w_out_bias``: [E, H], the experts' biases;
- ``shared_gate``:   [S, H], shared expert s scaled by σ(x · shared_gate[s]);
- ``quantized``:     the experts in the spec's weight format (``quant.layer.in_format``), beside
  the dense tensors they were quantized from; None for unquantized experts.

Weights are random (seeded) with 1/sqrt(fan_in) scale, so outputs are O(1) and never zero; biases
are random too, so that a path that drops one is seen to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moecap_kernels.dtypes import torch_dtype
from moecap_kernels.spec import MoESpec

if TYPE_CHECKING:
    from moecap_kernels.quant.quantize import QuantizedExperts


@dataclass(frozen=True)
class MoEWeights:
    router: torch.Tensor
    w_in: torch.Tensor
    w_out: torch.Tensor
    shared_w_in: torch.Tensor
    shared_w_out: torch.Tensor
    router_bias: torch.Tensor | None = None
    selection_bias: torch.Tensor | None = None
    w_in_bias: torch.Tensor | None = None
    w_out_bias: torch.Tensor | None = None
    shared_gate: torch.Tensor | None = None
    quantized: QuantizedExperts | None = None

    @property
    def device(self) -> torch.device:
        return self.w_in.device


def _scaled_randn(
    shape: tuple[int, ...], fan_in: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """N(0, 1/fan_in) samples drawn directly in ``dtype`` on ``device`` (no float32 staging copy)."""
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, fan_in**-0.5, generator=generator)


def random_weights(spec: MoESpec, device: torch.device | str = "cpu", seed: int = 0) -> MoEWeights:
    """Seeded random weights in ``spec.weight_dtype`` on ``device``."""
    device = torch.device(device)
    dtype = torch_dtype(spec.weight_dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    h, f, e = spec.hidden_size, spec.intermediate_size, spec.num_experts
    s, fs = spec.num_shared_experts, spec.shared_intermediate_size
    in_mult = 2 if spec.gated else 1

    def optional(wanted: bool, shape: tuple[int, ...], fan_in: int, as_dtype: torch.dtype = dtype):
        return _scaled_randn(shape, fan_in, as_dtype, device, gen) if wanted else None

    return MoEWeights(
        router=_scaled_randn((e, h), h, dtype, device, gen),
        w_in=_scaled_randn((e, in_mult * f, h), h, dtype, device, gen),
        w_out=_scaled_randn((e, h, f), f, dtype, device, gen),
        shared_w_in=_scaled_randn((s, in_mult * fs, h), h, dtype, device, gen),
        shared_w_out=_scaled_randn((s, h, fs), max(fs, 1), dtype, device, gen),
        # biases of the size of a score or an activation: ~N(0, 1/4) and N(0, 1/16)
        router_bias=optional(spec.router_bias, (e,), 4),
        selection_bias=optional(spec.selection_bias, (e,), 16, torch.float32),
        w_in_bias=optional(spec.expert_bias, (e, in_mult * f), 16),
        w_out_bias=optional(spec.expert_bias, (e, h), 16),
        shared_gate=optional(spec.shared_expert_gate, (s, h), h),
    )
