"""PROJECTED time of one MoE layer on a device we may not have, from the exact counts of a routing.

Inputs are exact: the routed pairs per expert of T tokens, the layer's bytes and FLOPs by the
project's own formulas (``metrics.traffic`` / ``metrics.work``) and the whole model's bytes in a
weight format (``spec.ModelFacts``). The projection is what is assumed on top, each assumption stated:

- **fit**: the model's weights on ``n = ⌈bytes / (memory · usable)⌉`` devices (KV cache and
  activations not counted beyond the unusable fraction);
- **placement**: on n devices, the routed experts split contiguously (E/n each, as ``--ep``), every
  device running all T tokens' pairs for its experts; the busiest device sets the time. Its routed
  bytes and FLOPs are exact (its activated experts, its pairs); the rest of the layer (shared
  experts, router, activations) is divided evenly over the n devices. Communication between the
  devices is not counted (``profile --project-ep`` projects it);
- **time** = max(bytes / (peak bandwidth · e_bw), FLOPs / (peak FLOP/s · e_flops)) per layer;
- **model**: tokens/s = T / (MoE layers · layer time): MoE layers only, attention not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from moecap_kernels.cost import Prices, cost_of
from moecap_kernels.metrics import traffic, work
from moecap_kernels.spec import ModelFacts, MoESpec


@dataclass(frozen=True)
class Target:
    """A device to project onto: its peaks for the layer's compute dtype, its memory, its price."""

    name: str
    memory_bytes: float
    bandwidth_bytes_per_s: float
    flops_per_s: float | None  # None: no figure for the compute dtype
    efficiency_bandwidth: float
    efficiency_flops: float
    efficiency_source: str
    peaks_source: str
    usd_per_hour: float | None = None
    price_source: str = ""
    measured_here: bool = False


@dataclass(frozen=True)
class Projection:
    """One (device, weight format, T): PROJECTED figures from exact counts."""

    target: Target
    weight_format: str
    tokens: int
    model_bytes: int
    devices: int
    busiest_bytes: int
    busiest_flops: int
    layer_time_s: float | None
    bound: str
    tokens_per_s: float | None  # through every MoE layer
    usd_per_mtok: float | None

    def to_dict(self) -> dict[str, object]:
        t = self.target
        return {
            "device": t.name,
            "weight_format": self.weight_format,
            "tokens": self.tokens,
            "model_weight_bytes": self.model_bytes,
            "devices_needed": self.devices,
            "busiest_device_bytes": self.busiest_bytes,
            "busiest_device_flops": self.busiest_flops,
            "layer_time_s": self.layer_time_s,
            "bound": self.bound,
            "tokens_per_s": self.tokens_per_s,
            "usd_per_mtok": self.usd_per_mtok,
            "usd_per_device_hour": t.usd_per_hour,
            "price_source": t.price_source or None,
            "efficiency_bandwidth": t.efficiency_bandwidth,
            "efficiency_flops": t.efficiency_flops,
            "efficiency_source": t.efficiency_source,
            "peaks_source": t.peaks_source,
            "measured_here": t.measured_here,
            "projected": True,
        }


def devices_needed(model_bytes: int, memory_bytes: float, usable: float) -> int:
    """The fewest devices whose usable memory holds ``model_bytes`` of weights."""
    return max(1, math.ceil(model_bytes / (memory_bytes * usable)))


def contiguous_owner(num_experts: int, ranks: int) -> list[int]:
    """The rank of each expert when E experts are split contiguously over ``ranks`` (≤ E) ranks."""
    base, extra = divmod(num_experts, ranks)
    return [r for r in range(ranks) for _ in range(base + (r < extra))]


def busiest_device(spec: MoESpec, tokens_per_expert: Sequence[int], devices: int) -> tuple[int, int]:
    """(bytes, FLOPs) of the busiest of ``devices`` holding the experts contiguously: its activated
    experts and pairs exactly, plus 1/n of what every device shares (shared experts, router, activations).
    With one device these are the layer's compulsory bytes and useful FLOPs."""
    tokens = sum(tokens_per_expert) // spec.top_k
    ranks = min(devices, spec.num_experts)
    owner = contiguous_owner(spec.num_experts, ranks)
    activated, pairs = [0] * ranks, [0] * ranks
    for expert, n in enumerate(tokens_per_expert):
        activated[owner[expert]] += n > 0
        pairs[owner[expert]] += n
    flops_per_pair = 2 * spec.params_per_expert
    layer_bytes = traffic(spec, tokens, 0)  # the rest of the layer: no routed expert's bytes
    layer_flops = work(spec, tokens, 0)
    best = max(range(ranks), key=lambda r: (activated[r] * spec.expert_weight_bytes, pairs[r]))
    routed_bytes = activated[best] * spec.expert_weight_bytes
    routed_flops = pairs[best] * flops_per_pair
    return (
        routed_bytes + math.ceil(layer_bytes.compulsory / devices),
        routed_flops + math.ceil(layer_flops.useful / devices),
    )


def project(
    spec: MoESpec,
    facts: ModelFacts,
    tokens_per_expert: Sequence[int],
    target: Target,
    usable: float,
) -> Projection:
    """The PROJECTED layer time, model tokens/s and $/Mtok of ``spec`` (in its weight format) on
    ``target``, for the routing whose per-expert pair counts are ``tokens_per_expert``."""
    tokens = sum(tokens_per_expert) // spec.top_k
    model_bytes = facts.weight_bytes(spec)
    n = devices_needed(model_bytes, target.memory_bytes, usable)
    nbytes, nflops = busiest_device(spec, tokens_per_expert, n)
    memory_s = nbytes / (target.bandwidth_bytes_per_s * target.efficiency_bandwidth)
    if target.flops_per_s is None:
        return Projection(
            target, spec.weight_format, tokens, model_bytes, n, nbytes, nflops, None, "—", None, None
        )
    compute_s = nflops / (target.flops_per_s * target.efficiency_flops)
    layer_s = max(memory_s, compute_s)
    tokens_per_s = tokens / (facts.moe_layers * layer_s)
    prices = Prices(target.usd_per_hour, target.price_source, None, "", devices=n)
    usd = cost_of(tokens_per_s, None, prices, per="token through every MoE layer").rental_usd_per_mtok
    bound = "memory" if memory_s >= compute_s else "compute"
    return Projection(
        target, spec.weight_format, tokens, model_bytes, n, nbytes, nflops, layer_s, bound, tokens_per_s, usd
    )
