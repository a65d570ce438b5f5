"""One rank's share of an expert-parallel MoE layer, and its forward in four phases.

Each rank owns its own T tokens (data-parallel attention in front of the layer) and a copy of the
router and of the shared experts; it holds only its placed experts. A forward:

1. **router**: top-k of its own tokens, as the single-process layer routes them;
2. **dispatch**: pairs sorted by (expert's rank, local expert); the [N, L] pair counts exchanged with
   ``all_to_all_single`` (the splits of the next step, read on the host), then one activation row per
   pair sent with ``all_to_all_single`` (rows already scaled by their routing weight where the layer
   weights the input, Llama 4);
3. **experts**: the received rows through any backend, as a layer of the rank's local experts with
   top-1 routing and weight 1; the shared experts on its own tokens through the same backend, as a
   layer whose "routed" experts are the shared ones, every token to each (weighted by its gate);
4. **combine**: the output rows sent back with ``all_to_all_single`` and summed per token in float32
   with their routing weights, plus the shared experts' output.

A backend sees an ordinary layer; it knows nothing of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moecap_kernels.backends import get_backend
from moecap_kernels.backends.base import shared_as_routing
from moecap_kernels.ep.placement import Placement
from moecap_kernels.ep.traffic import DestinationTables
from moecap_kernels.quant.layer import in_format
from moecap_kernels.routing import route_tokens
from moecap_kernels.spec import MoESpec
from moecap_kernels.sublayers import local_spec, shared_spec, shared_weights_as_layer
from moecap_kernels.weights import MoEWeights


@dataclass
class Dispatched:
    """What the dispatch of one forward leaves for the experts and the combine."""

    order: torch.Tensor  # [T·k] pair indices sorted by (rank, local expert)
    counts: torch.Tensor  # [N, L] pairs this rank sends
    received_counts: torch.Tensor  # [N, L] pairs this rank receives, by source
    send_splits: list[int]
    recv_splits: list[int]
    rows: torch.Tensor  # [n, H] received activation rows
    local_ids: torch.Tensor  # [n, 1] their local expert


class RankLayer:
    """Rank ``rank``'s part of the layer in weight format ``spec.weight_format``, run by ``backend``."""

    def __init__(
        self,
        spec: MoESpec,
        layer: MoEWeights,
        experts: MoEWeights,
        placement: Placement,
        rank: int,
        backend: str,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        """``layer``: the router, its biases and the shared experts (its routed experts are not read);
        ``experts``: the dense weights of this rank's experts (``local_weights``)."""
        self.spec, self.placement, self.rank, self.group = spec, placement, rank, group
        self.router = layer  # route_tokens reads the router, its bias and the selection bias only
        self.experts = placement.experts_of_rank[rank]
        self.local_spec = local_spec(spec, len(self.experts))
        self.local_weights = in_format(experts, self.local_spec)
        self.local_backend = get_backend(backend)
        self.shared_spec = shared_spec(spec) if spec.num_shared_experts else None
        if self.shared_spec is not None:
            self.shared_weights = in_format(shared_weights_as_layer(layer), self.shared_spec)
            self.shared_backend = get_backend(backend)
        self.tables = DestinationTables.build(placement, rank, layer.device)
        local_index = torch.arange(placement.max_local_experts, device=layer.device)
        self.local_index = local_index.repeat(placement.ranks)

    def prepare(self, tokens: int, received: int) -> None:
        """The backends' one-time work for ``tokens`` own tokens and ``received`` rows."""
        self.local_backend.prepare(self.local_weights, self.local_spec, max(received, 1))
        if self.shared_spec is not None:
            self.shared_backend.prepare(self.shared_weights, self.shared_spec, tokens)

    # --- the four phases ---------------------------------------------------------------------

    def route(self, x: torch.Tensor, forced: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return route_tokens(x, self.router, self.spec, forced)

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, topk_weights: torch.Tensor) -> Dispatched:
        k = ids.shape[1]
        keys = self.tables.keys(ids)
        order = torch.argsort(keys, stable=True)
        counts = self.tables.pair_counts(keys)
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=self.group)
        send_splits = counts.sum(dim=1).tolist()  # the host needs the splits: one sync, as in any EP
        recv_splits = received_counts.sum(dim=1).tolist()
        rows = x[order // k]
        if self.spec.weights_on_input:
            rows = rows * topk_weights.reshape(-1)[order, None].to(rows.dtype)
        received = rows.new_empty(sum(recv_splits), x.shape[1])
        dist.all_to_all_single(received, rows, recv_splits, send_splits, group=self.group)
        local_ids = self.local_index.repeat_interleave(received_counts.reshape(-1))
        return Dispatched(
            order, counts, received_counts, send_splits, recv_splits, received, local_ids[:, None]
        )

    def compute(self, x: torch.Tensor, d: Dispatched) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the received rows' expert outputs [n, H], the shared experts' output [T, H] or None)."""
        if d.rows.shape[0]:
            ones = torch.ones(d.local_ids.shape, dtype=torch.float32, device=x.device)
            out = self.local_backend.forward(d.rows, self.local_weights, self.local_spec, d.local_ids, ones)
        else:
            out = d.rows
        if self.shared_spec is None:
            return out, None
        ids, gates = shared_as_routing(x, self.router, self.spec)  # the full layer's shared gate
        return out, self.shared_backend.forward(x, self.shared_weights, self.shared_spec, ids, gates)

    def combine(
        self,
        x: torch.Tensor,
        d: Dispatched,
        out: torch.Tensor,
        shared: torch.Tensor | None,
        topk_weights: torch.Tensor,
    ) -> torch.Tensor:
        back = out.new_empty(len(d.order), x.shape[1])
        dist.all_to_all_single(back, out, d.send_splits, d.recv_splits, group=self.group)
        k = topk_weights.shape[1]
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        contrib = back.float()
        if not self.spec.weights_on_input:
            contrib = contrib * topk_weights.reshape(-1)[d.order, None]
        y.index_add_(0, d.order // k, contrib)
        if shared is not None:
            y += shared.float()
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor, forced: torch.Tensor | None = None) -> torch.Tensor:
        """The four phases in a row (untimed use: tests, warm-up)."""
        ids, w = self.route(x, forced)
        d = self.dispatch(x, ids, w)
        out, shared = self.compute(x, d)
        return self.combine(x, d, out, shared, w)
