"""Parts of a layer run as layers of their own, so that any backend computes them unchanged: a
subset of the routed experts (one rank's, a cache's slots) with top-1 routing given, or the shared
experts as routed experts that every token goes to."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import MoEWeights

# A sub-layer's routing is given, not chosen: its router fields are neutral.
_NO_ROUTER = dict(
    router_scoring="softmax",
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    selection_bias=False,
    router_bias=False,
    routed_scaling_factor=1.0,
    renormalize=False,
    num_shared_experts=0,
    shared_intermediate_size=0,
    shared_expert_gate=False,
    weights_on_input=False,
)


def local_spec(spec: MoESpec, num_local: int) -> MoESpec:
    """The layer of one rank's ``num_local`` experts, each received row routed to one of them."""
    return dataclasses.replace(
        spec, name=f"{spec.name} (rank experts)", num_experts=num_local, top_k=1, **_NO_ROUTER
    )


def shared_spec(spec: MoESpec) -> MoESpec:
    """The shared experts as a layer of S routed experts, every token sent to each."""
    s = spec.num_shared_experts
    return dataclasses.replace(
        spec,
        name=f"{spec.name} (shared experts)",
        num_experts=s,
        top_k=s,
        intermediate_size=spec.shared_intermediate_size,
        expert_bias=False,
        **_NO_ROUTER,
    )


def _take(t: torch.Tensor | None, experts: Sequence[int]) -> torch.Tensor | None:
    """Rows ``experts`` of a stacked tensor: a view when they are consecutive, else a copy."""
    if t is None:
        return None
    first = experts[0]
    if list(experts) == list(range(first, first + len(experts))):
        return t[first : first + len(experts)]
    return t[torch.tensor(list(experts), device=t.device)]


def _no_shared(weights: MoEWeights, like: torch.Tensor) -> dict[str, torch.Tensor]:
    h = like.shape[-1]
    empty = lambda *shape: torch.empty(shape, dtype=like.dtype, device=like.device)  # noqa: E731
    return {"shared_w_in": empty(0, 0, h), "shared_w_out": empty(0, h, 0)}


def local_weights(weights: MoEWeights, experts: Sequence[int], own: bool = False) -> MoEWeights:
    """The dense weights of ``experts`` (global ids) as a layer of their own, no shared experts:
    views of ``weights`` where they can be, or (``own``) copies that outlive them."""
    take = (
        (lambda t: None if t is None else _take(t, experts).clone()) if own else (lambda t: _take(t, experts))
    )
    return MoEWeights(
        router=take(weights.router),
        w_in=take(weights.w_in),
        w_out=take(weights.w_out),
        w_in_bias=take(weights.w_in_bias),
        w_out_bias=take(weights.w_out_bias),
        **_no_shared(weights, weights.w_in),
    )


def without_experts(weights: MoEWeights) -> MoEWeights:
    """``weights`` with its routed experts dropped (empty): what routing and shared experts need."""
    empty = lambda t: None if t is None else t.new_empty((0, *t.shape[1:]))  # noqa: E731
    return dataclasses.replace(
        weights,
        w_in=empty(weights.w_in),
        w_out=empty(weights.w_out),
        w_in_bias=empty(weights.w_in_bias),
        w_out_bias=empty(weights.w_out_bias),
    )


def shared_weights_as_layer(weights: MoEWeights) -> MoEWeights:
    """The shared experts' dense weights as the routed experts of a layer."""
    return MoEWeights(
        router=weights.shared_w_in[:, 0, :],
        w_in=weights.shared_w_in,
        w_out=weights.shared_w_out,
        **_no_shared(weights, weights.w_in),
    )
