"""Expert parallelism past this machine, PROJECTED: the exact traffic of N ranks on a routing, and
the time its dispatch and combine would take on a link we do not have, beside the expert time of the
busiest rank measured here.

Counts need no expert computed, so N can be 64 or 256 on one machine: the layer's N·T tokens are
routed (router, synthetic or trace) and counted per (source rank, expert's rank, local expert).

Per rank r, with the link's one-way bandwidth B and per-message latency α (``links.json``):

- dispatch_r = α · 2 · peers_r + max(off-rank bytes sent, off-rank bytes received) / B
  (the count exchange and the rows: one message each per peer);
- combine_r = α · peers_r + the same byte term (the rows come back);

where peers_r = max(ranks r sends pairs to, ranks it receives from), itself excluded. Every figure
of this module but the measured expert time is a projection, and is labelled as one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import torch

from moecap_kernels.backends import get_backend
from moecap_kernels.backends.base import shared_routing
from moecap_kernels.dtypes import torch_dtype
from moecap_kernels.ep.placement import Placement
from moecap_kernels.ep.traffic import balancedness, dispatch_counts, off_rank, row_bytes, scaled
from moecap_kernels.errors import UserError
from moecap_kernels.quant.layer import in_format
from moecap_kernels.routing import route_tokens
from moecap_kernels.runner import ProfileRequest, forced_ids
from moecap_kernels.spec import MoESpec
from moecap_kernels.sublayers import local_spec, shared_spec
from moecap_kernels.timing import TimingStats, time_region
from moecap_kernels.weights import MoEWeights, random_weights


@dataclass(frozen=True)
class Link:
    key: str
    name: str
    bytes_per_s: float  # one direction
    latency_s: float
    source: str
    latency_source: str


@cache
def _table() -> dict[str, Any]:
    return json.loads(resources.files("moecap_kernels.ep").joinpath("links.json").read_text())


def link_names() -> list[str]:
    return list(_table()["links"])


def resolve_links(names: list[str], bandwidth: float | None, latency: float | None) -> list[Link]:
    """The links of ``--link`` (each with ``--link-bandwidth`` / ``--link-latency`` in place of its
    figures when given); ``--link-bandwidth`` alone is a link of its own."""
    table = _table()["links"]
    if not names:
        if bandwidth is None:
            raise UserError(f"--project-ep needs --link ({', '.join(table)}) or --link-bandwidth")
        return [
            Link(
                "custom",
                "given link",
                bandwidth,
                latency or 0.0,
                "--link-bandwidth",
                "--link-latency" if latency is not None else "none (0)",
            )
        ]
    links = []
    for name in names:
        if name not in table:
            raise UserError(f"unknown link {name!r}; known links: {', '.join(table)}")
        e = table[name]
        links.append(
            Link(
                name,
                e["name"],
                bandwidth if bandwidth is not None else float(e["bytes_per_s"]),
                latency if latency is not None else float(e["latency_s"]),
                "--link-bandwidth" if bandwidth is not None else e["source"],
                "--link-latency" if latency is not None else "assumed (links.json)",
            )
        )
    return links


def router_weights(request: ProfileRequest) -> MoEWeights:
    """Enough of the layer to route: a checkpoint's layer, or a random router of the layer's shape
    (its experts one column wide, never computed)."""
    if request.checkpoint is not None:
        return request.layer_weights()
    narrow = dataclasses.replace(
        request.spec,
        intermediate_size=1,
        num_shared_experts=0,
        shared_intermediate_size=0,
        shared_expert_gate=False,
        weight_format="none",
    )
    return random_weights(narrow, request.device, request.seed)


def global_routing(request: ProfileRequest, tokens: int) -> torch.Tensor:
    """int64 [N·T, k] expert ids of the layer's tokens, routed as a profile routes them."""
    spec, device = request.spec, request.device
    forced = forced_ids(request.routing, tokens, spec, request.seed)
    if forced is not None:
        return forced.to(device)
    weights = router_weights(request)
    gen = torch.Generator(device=device).manual_seed(request.seed + tokens)
    x = torch.randn(tokens, spec.hidden_size, generator=gen, device=device).to(torch_dtype(spec.act_dtype))
    return route_tokens(x, weights, spec)[0]


def link_times(pairs: list[list[int]], spec: MoESpec, link: Link) -> tuple[list[float], list[float]]:
    """(dispatch seconds, combine seconds) per rank on ``link`` (module docstring)."""
    n = len(pairs)
    sent, received = off_rank(scaled(pairs, row_bytes(spec)))
    peers = [
        max(
            sum(1 for c in range(n) if c != r and pairs[r][c]),
            sum(1 for s in range(n) if s != r and pairs[s][r]),
        )
        for r in range(n)
    ]
    volume = [max(sent[r], received[r]) / link.bytes_per_s for r in range(n)]
    dispatch = [2 * link.latency_s * peers[r] + volume[r] for r in range(n)]
    combine = [link.latency_s * peers[r] + volume[r] for r in range(n)]
    return dispatch, combine


def measure_rank_experts(
    request: ProfileRequest, placement: Placement, rank: int, received: list[int], per_rank: int, backend: str
) -> TimingStats:
    """Time, on this machine, one rank's experts on the rows it receives (random weights of its
    local experts and, when the layer has them, its shared experts on its own T tokens)."""
    spec, device = request.spec, request.device
    local = local_spec(spec, len(placement.experts_of_rank[rank]))
    weights = in_format(random_weights(local, device, request.seed), local)
    counts = torch.tensor(received[: local.num_experts], device=device)
    ids = torch.arange(local.num_experts, device=device).repeat_interleave(counts)[:, None]
    gen = torch.Generator(device=device).manual_seed(request.seed)
    act = torch_dtype(spec.act_dtype)
    rows = torch.randn(ids.shape[0], spec.hidden_size, generator=gen, device=device).to(act)
    ones = torch.ones(ids.shape, dtype=torch.float32, device=device)
    experts = get_backend(backend)
    experts.prepare(weights, local, max(rows.shape[0], 1))
    runs = []
    if rows.shape[0]:
        runs.append(lambda: experts.forward(rows, weights, local, ids, ones))
    if spec.num_shared_experts:
        s_spec = shared_spec(spec)
        s_weights = in_format(random_weights(s_spec, device, request.seed + 1), s_spec)
        x = torch.randn(per_rank, spec.hidden_size, generator=gen, device=device).to(act)
        s_ids, gates = shared_routing(per_rank, spec.num_shared_experts, device)
        if spec.shared_expert_gate:  # the gates' values do not change the work
            gates = torch.sigmoid(torch.randn(gates.shape, generator=gen, device=device))
        shared = get_backend(backend)
        shared.prepare(s_weights, s_spec, per_rank)
        runs.append(lambda: shared.forward(x, s_weights, s_spec, s_ids, gates))
    return time_region(lambda i: [run() for run in runs], device, warmup=request.warmup, reps=request.reps)


def project_ep(
    request: ProfileRequest,
    placement: Placement,
    per_rank: int,
    links: list[Link],
    backend: str,
    device_name: str,
) -> list[dict[str, Any]]:
    """One PROJECTED record per link for ``placement.ranks`` ranks of ``per_rank`` tokens each."""
    spec, n = request.spec, placement.ranks
    ids = global_routing(request, n * per_rank)
    counts = dispatch_counts(list(ids.split(per_rank)), placement)  # [N, N, L]
    pairs = counts.sum(dim=2).tolist()
    per_expert = counts.sum(dim=0).tolist()  # [N, L] received per local expert
    received = [sum(row) for row in per_expert]
    busiest = max(range(n), key=lambda r: received[r])
    expert_time = measure_rank_experts(request, placement, busiest, per_expert[busiest], per_rank, backend)
    sent_off, recv_off = off_rank(scaled(pairs, row_bytes(spec)))
    records = []
    for link in links:
        dispatch, combine = link_times(pairs, spec, link)
        comm = max(dispatch) + max(combine)
        records.append(
            {
                "projected": True,
                "ranks": n,
                "tokens_per_rank": per_rank,
                "routing": request.routing.describe(),
                "placement": placement.source,
                "link": {
                    "key": link.key,
                    "name": link.name,
                    "bytes_per_s": link.bytes_per_s,
                    "latency_s": link.latency_s,
                    "source": link.source,
                    "latency_source": link.latency_source,
                },
                "traffic_pairs": pairs,
                "received_pairs": received,
                "balancedness": balancedness(received),
                "dispatch_off_rank_bytes_max": max(max(sent_off), max(recv_off)),
                "dispatch_s": dispatch,
                "combine_s": combine,
                "dispatch_s_max": max(dispatch),
                "combine_s_max": max(combine),
                "busiest_rank": busiest,
                "expert_time_s": {
                    **expert_time.to_dict(),
                    "measured_on": device_name,
                    "backend": backend,
                    "weight_format": spec.weight_format,
                },
                "comm_share": comm / (comm + expert_time.median),
            }
        )
    return records
