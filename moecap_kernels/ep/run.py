"""The expert-parallel profile: every rank times and counts its share of the layer; rank 0 gathers
the ranks' figures once, at the end, into one ``RowResult`` per (scenario, format, backend).

The layer's tokens are the N·T tokens of one step (each rank owns T of them, in rank order), made and
routed exactly as a single-process row of N·T tokens: the inputs, the forced routing and the
references are that row's, so the expert-parallel output is compared with the single-process layer.

Per repetition each rank times its four phases with ``perf_counter``, the device synchronised at
each boundary; the step's time is the slowest rank's sum. After the repetitions, an all-to-all of
bare bytes with the dispatch's own message sizes is timed as the ceiling of the dispatch.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moecap_kernels.backends import get_backend
from moecap_kernels.counters import CountAccumulator, Counts
from moecap_kernels.ep.layer import RankLayer
from moecap_kernels.ep.placement import Placement
from moecap_kernels.ep.traffic import balancedness, off_rank, row_bytes, scaled
from moecap_kernels.errors import UserError
from moecap_kernels.hardware import DeviceInfo, Peaks
from moecap_kernels.metrics import Traffic, traffic, utilization, work
from moecap_kernels.quant.layer import in_format
from moecap_kernels.reference import relative_error
from moecap_kernels.runner import INPUT_COPIES, ProfileRequest, Row, RowResult, Scenario, needs_flush
from moecap_kernels.spec import MoESpec
from moecap_kernels.sublayers import local_weights, without_experts
from moecap_kernels.timing import CacheFlusher, TimingStats
from moecap_kernels.weights import MoEWeights

PHASES = ("router", "dispatch", "experts", "combine")
KILL_RANK_ENV = "MOECAP_EP_TEST_KILL_RANK"  # fault injection for the tests: that rank dies mid-run


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks."""

    rank: int
    size: int
    placement: Placement
    device: torch.device
    devices_shared: bool  # every rank on one device (a CPU, one GPU): they share its peaks

    def tokens(self, per_rank: int) -> slice:
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def _clock(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":
        return lambda: (torch.cuda.synchronize(device), time.perf_counter())[1]
    return time.perf_counter


def _die_if_asked(rank: int) -> None:
    if os.environ.get(KILL_RANK_ENV, "") == str(rank):
        os.kill(os.getpid(), signal.SIGKILL)


def measure_rank(
    request: ProfileRequest,
    weights: MoEWeights,
    experts: MoEWeights,
    row: Row,
    per_rank: int,
    backend: str,
    ranks: Ranks,
    flush: CacheFlusher | None,
) -> dict[str, Any]:
    """Time and count this rank's share of ``reps`` forwards; everything returned is host data."""
    spec, device = request.spec, ranks.device
    layer = RankLayer(spec, weights, experts, ranks.placement, ranks.rank, backend)
    own = ranks.tokens(per_rank)
    inputs = [x[own] for x in row.inputs]
    forced = None if row.forced is None else row.forced[own]
    sources = CountAccumulator(spec, device)
    received = CountAccumulator(layer.local_spec, device)
    pairs_sent = torch.zeros(ranks.size, dtype=torch.int64, device=device)
    clock = _clock(device)

    def step(i: int) -> tuple[torch.Tensor, list[float], list[int]]:
        x = inputs[i % INPUT_COPIES]
        t0 = clock()
        ids, w = layer.route(x, forced)
        sources.add(ids)
        t1 = clock()
        d = layer.dispatch(x, ids, w)
        pairs_sent.add_(d.counts.sum(dim=1))
        t2 = clock()
        out, shared = layer.compute(x, d)
        received.add(d.local_ids)
        t3 = clock()
        y = layer.combine(x, d, out, shared, w)
        t4 = clock()
        return y, [t1 - t0, t2 - t1, t3 - t2, t4 - t3], d.send_splits

    y, _, send_splits = step(0)  # the backends learn how many rows this rank receives
    _die_if_asked(ranks.rank)
    layer.prepare(per_rank, int(received.read().routed_pairs))
    for i in range(1, max(request.warmup, 1)):
        step(i)
    for counter in (sources, received):
        counter.reset()
    pairs_sent.zero_()
    samples = []
    for i in range(request.reps):
        if flush is not None:
            flush()
        dist.barrier()
        y, phases, send_splits = step(i)
        samples.append(phases)
    reps = request.reps
    sent = pairs_sent.cpu().tolist()
    if any(v % reps for v in sent):
        raise RuntimeError("routing changed between repetitions")
    return {
        "phases_s": samples,
        "alltoall_s": _alltoall_ceiling(send_splits, row_bytes(spec), reps, ranks, clock),
        "sources": sources.read().per_forward(),
        "received": received.read().per_forward(),
        "pairs_sent": [v // reps for v in sent],
        "experts": list(layer.experts),
        "output": y.cpu(),
        "counter_impl": sources.implementation,
    }


def _alltoall_ceiling(
    send_splits: list[int], bytes_per_row: int, reps: int, ranks: Ranks, clock: Callable[[], float]
) -> list[float]:
    """Seconds of an all_to_all_single of bare bytes with the dispatch's own message sizes."""
    send = [n * bytes_per_row for n in send_splits]
    recv_t = torch.empty(ranks.size, dtype=torch.int64, device=ranks.device)  # NCCL: device tensors
    dist.all_to_all_single(recv_t, torch.tensor(send, dtype=torch.int64, device=ranks.device))
    recv = recv_t.tolist()
    src = torch.randint(0, 255, (sum(send),), dtype=torch.uint8, device=ranks.device)
    dst = torch.empty(sum(recv), dtype=torch.uint8, device=ranks.device)
    seconds = []
    for _ in range(reps + 1):
        dist.barrier()
        t0 = clock()
        dist.all_to_all_single(dst, src, recv, send)
        seconds.append(clock() - t0)
    return seconds[1:]  # the first one sets up the buffers


def _sum(items: list[Any]) -> Any:
    """Field-wise sum of dataclasses of ints (Traffic, Work)."""
    cls = type(items[0])
    return cls(**{f.name: sum(getattr(i, f.name) for i in items) for f in dataclasses.fields(cls)})


def global_counts(spec: MoESpec, per_rank: list[Counts]) -> Counts:
    """The layer's counts from each source rank's: the single-process counts of the N·T tokens."""
    tokens_per_expert = tuple(int(sum(c)) for c in zip(*(r.tokens_per_expert for r in per_rank), strict=True))
    activated = sum(1 for n in tokens_per_expert if n)
    routed = sum(tokens_per_expert)
    return Counts(
        forwards=1,
        tokens_per_expert=tokens_per_expert,
        activated_experts=activated,
        routed_pairs=routed,
        expert_weight_bytes=activated * spec.expert_weight_bytes,
        expert_flops=routed * 2 * spec.params_per_expert,
        invalid_ids=sum(r.invalid_ids for r in per_rank),
    )


def rank_traffic(spec: MoESpec, tokens: int, received: Counts, local_experts: int) -> Traffic:
    """One rank's compulsory bytes: its activated local experts, and the router, shared experts and
    activations of its own tokens; dense = every local expert read."""
    t = traffic(spec, tokens, received.expert_weight_bytes)
    always = t.dense - spec.num_experts * spec.expert_weight_bytes
    return dataclasses.replace(t, dense=local_experts * spec.expert_weight_bytes + always)


def slowest_steps(gathered: list[dict[str, Any]]) -> np.ndarray:
    """Seconds of the step per repetition: the slowest rank's four phases together."""
    return np.array([g["phases_s"] for g in gathered]).sum(axis=2).max(axis=0)


def _medians(samples: np.ndarray) -> dict[str, float]:
    return {p: float(v) for p, v in zip(PHASES, np.median(samples, axis=0), strict=True)}


def aggregate_peaks(peaks: Peaks, ranks: Ranks) -> Peaks:
    """The peaks of the devices the ranks run on: one shared device, or one device per rank."""
    if ranks.devices_shared:
        note = f" (one device shared by {ranks.size} ranks)"
        return dataclasses.replace(
            peaks, bandwidth_source=peaks.bandwidth_source + note, flops_source=peaks.flops_source + note
        )
    n = ranks.size
    return dataclasses.replace(
        peaks,
        bandwidth_bytes_per_s=peaks.bandwidth_bytes_per_s * n,
        flops_per_s=peaks.flops_per_s * n,
        bandwidth_source=f"{n} × {peaks.bandwidth_source}",
        flops_source=f"{n} × {peaks.flops_source}",
    )


def ep_block(
    spec: MoESpec, ranks: Ranks, backend: str, gathered: list[dict[str, Any]], peaks: Peaks, per_rank: int
) -> dict[str, Any]:
    """The ``ep`` record of a row (README: JSON)."""
    n, b = ranks.size, row_bytes(spec)
    pairs = [g["pairs_sent"] for g in gathered]
    received = [sum(pairs[s][r] for s in range(n)) for r in range(n)]
    phases = np.array([g["phases_s"] for g in gathered])  # [N, reps, 4]
    per_rank_medians = np.median(phases, axis=1)  # [N, 4]
    comm = float(np.median(phases[:, :, 1] + phases[:, :, 3], axis=1).sum())  # Σ over ranks
    sent_off, recv_off = off_rank(scaled(pairs, b))
    ceiling = [float(np.median(g["alltoall_s"])) for g in gathered]
    dispatch = per_rank_medians[:, 1]
    rows = []
    for r, g in enumerate(gathered):
        expert_bytes = (
            g["received"].expert_weight_bytes + spec.num_shared_experts * spec.shared_expert_weight_bytes
        )
        rows.append(
            {
                "rank": r,
                "experts": g["experts"],
                "received_pairs": received[r],
                "activated_experts": g["received"].activated_experts,
                "expert_bytes": expert_bytes,
                "time_s": dict(zip(PHASES, map(float, per_rank_medians[r]), strict=True)),
                "s_mbu_experts": expert_bytes / per_rank_medians[r, 2] / peaks.bandwidth_bytes_per_s,
                "dispatch_sent_off_rank_bytes": sent_off[r],
                "dispatch_received_off_rank_bytes": recv_off[r],
                "dispatch_bandwidth_bytes_per_s": max(sent_off[r], recv_off[r]) / dispatch[r],
                "alltoall_ceiling_s": ceiling[r],
                "alltoall_ceiling_bytes_per_s": max(sent_off[r], recv_off[r]) / ceiling[r],
            }
        )
    expert_bytes_all = sum(r["expert_bytes"] for r in rows)
    return {
        "ranks": n,
        "tokens_per_rank": per_rank,
        "backend": backend,
        "placement": ranks.placement.to_dict(),
        "devices_shared": ranks.devices_shared,
        "traffic_pairs": pairs,
        "dispatch_bytes": scaled(pairs, b),
        "combine_bytes": scaled(pairs, b),
        "count_exchange_bytes_per_rank": n * ranks.placement.max_local_experts * 8,
        "received_pairs": received,
        "activated_experts": [g["received"].activated_experts for g in gathered],
        "balancedness": balancedness(received),
        "time_s": _medians(per_rank_medians),
        "time_s_slowest_rank": {
            p: float(v) for p, v in zip(PHASES, per_rank_medians.max(axis=0), strict=True)
        },
        "step_time_s": float(np.median(slowest_steps(gathered))),
        "comm_share": comm / float(np.median(phases.sum(axis=2), axis=1).sum()),
        # the ranks' experts together: Σ bytes / their mean time / the peak of the devices they run on
        "s_mbu_experts": expert_bytes_all
        / float(per_rank_medians[:, 2].mean())
        / (peaks.bandwidth_bytes_per_s * (1 if ranks.devices_shared else n)),
        "dispatch_vs_alltoall_ceiling": float(np.median(np.array(ceiling) / dispatch)),
        "per_rank": rows,
    }


def build_row(
    request: ProfileRequest,
    fmt_weights: Any,
    row: Row,
    scenario: Scenario,
    backend: str,
    ranks: Ranks,
    gathered: list[dict[str, Any]],
    info: DeviceInfo,
    peaks: Peaks,
    flushed: bool,
) -> RowResult:
    """Rank 0: the layer's row from every rank's figures."""
    spec, per_rank = request.spec, scenario.tokens
    counts = global_counts(spec, [g["sources"] for g in gathered])
    if counts.invalid_ids:
        raise UserError(f"routing produced {counts.invalid_ids} expert ids outside [0, {spec.num_experts})")
    bytes_ = _sum([rank_traffic(spec, per_rank, g["received"], len(g["experts"])) for g in gathered])
    flops = _sum([work(spec, per_rank, g["received"].expert_flops) for g in gathered])
    timing = TimingStats(
        tuple(float(s) for s in slowest_steps(gathered)),
        "perf_counter by phase, device synchronised; slowest rank",
    )
    total = aggregate_peaks(peaks, ranks)
    ep = ep_block(spec, ranks, backend, gathered, peaks, per_rank)
    output = torch.cat([g["output"] for g in gathered]).to(request.device)
    check = request.check_accuracy
    if check:
        single = get_backend(backend).forward(row.inputs[0], fmt_weights, spec, row.ids, row.topk_weights)
        ep["rel_error_vs_single_process"] = relative_error(output, single.double())
    return RowResult(
        spec=spec,
        scenario=scenario,
        tokens=ranks.size * per_rank,
        backend=f"{backend} ep{ranks.size}",
        device=info,
        routing=request.routing.describe(),
        weights_source=request.weights_source,
        counts=counts,
        bytes=bytes_,
        flops=flops,
        time=timing,
        peaks=total,
        util=utilization(bytes_, flops, timing.median, total.bandwidth_bytes_per_s, total.flops_per_s),
        rel_error=relative_error(output, row.reference(fmt_weights, spec)) if check else None,
        cache_flushed=flushed,
        counter_impl=gathered[0]["counter_impl"],
        extras={"ep": ep},
        quant_rel_error=relative_error(output, row.reference()) if check else None,
    )


def run_ep_profile(
    request: ProfileRequest,
    ranks: Ranks,
    info: DeviceInfo,
    peaks: dict[str, Peaks],
    on_row: Callable[[RowResult], None] = lambda row: None,
) -> list[RowResult]:
    """Every (scenario, format, backend) of ``request`` on every rank; the rows on rank 0 ([] elsewhere).

    Every rank makes (or loads) the whole layer as a single process does, so its experts are the
    single-process layer's; it then keeps its own experts, the router and the shared experts, and
    rank 0 the whole layer too, for the references.
    """
    weights = request.layer_weights()
    experts = local_weights(weights, ranks.placement.experts_of_rank[ranks.rank], own=ranks.rank != 0)
    if ranks.rank != 0:  # rank 0 keeps the whole layer for the single-process references
        weights = without_experts(weights)
    results = []
    flusher = None
    for scenario in request.scenarios:
        per_rank = scenario.tokens
        row = Row(request, weights, scenario, ranks.size * per_rank)
        flush = needs_flush(request.spec, row, info)
        if flush and flusher is None:
            flusher = CacheFlusher(info.llc_bytes, ranks.device)
        for name in request.weight_formats:
            fmt_request = request.in_format(name)
            fmt_weights = in_format(weights, fmt_request.spec) if ranks.rank == 0 else None
            for backend in request.backends_for(name):
                mine = measure_rank(
                    fmt_request, weights, experts, row, per_rank, backend, ranks, flusher if flush else None
                )
                gathered: list[Any] = [None] * ranks.size
                dist.all_gather_object(gathered, mine)
                if ranks.rank == 0:
                    result = build_row(
                        fmt_request,
                        fmt_weights,
                        row,
                        scenario,
                        backend,
                        ranks,
                        gathered,
                        info,
                        peaks[fmt_request.spec.compute_dtype],
                        flush,
                    )
                    results.append(result)
                    on_row(result)
    return results
