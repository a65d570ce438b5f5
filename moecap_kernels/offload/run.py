"""The offloaded run of a routing sequence: experts in a slow tier, C of them in a fast tier, each
step fetching its misses and computing with any backend, every figure counted exactly.

The fast tier is a layer of C slots (``sublayers.local_spec``): a fetched expert's record is read
into the slot of the expert the policy evicted (or a free one; with C = 0, a one-slot staging
buffer). A step's accesses (``cache.simulate``, ascending expert ids) are taken in chunks that never
evict an expert of their own chunk; each chunk's misses are fetched, then its routed pairs computed
by the backend as top-1 rows of the slot layer; the shared experts are computed by the same backend
(``sublayers.shared_spec``). Fetch and compute run one after the other (no overlap). Beside it the
same steps are timed with every expert resident, as one forward of the backend per step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moecap_kernels.backends import get_backend
from moecap_kernels.backends.base import shared_as_routing
from moecap_kernels.dtypes import torch_dtype
from moecap_kernels.metrics import traffic
from moecap_kernels.offload.cache import Access, CacheCounts, simulate, step_experts
from moecap_kernels.offload.tier import DiskTier, expert_tensors
from moecap_kernels.reference import relative_error
from moecap_kernels.routing import route_tokens
from moecap_kernels.spec import MoESpec
from moecap_kernels.sublayers import local_spec, local_weights, shared_spec, shared_weights_as_layer
from moecap_kernels.weights import MoEWeights


def chunks(accesses: list[Access], capacity: int) -> list[list[Access]]:
    """A step's accesses split so that no access evicts an expert of its own chunk, and no chunk
    holds more experts than the fast tier (one, with C = 0)."""
    out: list[list[Access]] = [[]]
    for a in accesses:
        current = out[-1]
        if len(current) >= max(capacity, 1) or any(c.expert == a.evicted for c in current):
            out.append(current := [])
        current.append(a)
    return [c for c in out if c]


class FastTier:
    """C slots laid out as a layer of C experts, and which expert each slot holds."""

    def __init__(self, spec: MoESpec, weights: MoEWeights, capacity: int) -> None:
        slots = max(capacity, 1)
        self.spec = local_spec(spec, slots)
        self.weights = local_weights(weights, [0] * slots, own=True)  # shapes and dtypes of one expert
        self.capacity, self.slot_of = capacity, {}
        self.free = list(range(slots - 1, -1, -1))

    def place(self, a: Access) -> int:
        """The slot access ``a`` reads: its expert's, or the one it fetches into."""
        if a.hit:
            return self.slot_of[a.expert]
        if a.evicted >= 0:
            slot = self.slot_of.pop(a.evicted)
        elif self.capacity == 0:
            slot = 0
        else:
            slot = self.free.pop()
        if self.capacity > 0:
            self.slot_of[a.expert] = slot
        return slot


def step_inputs(
    spec: MoESpec, weights: MoEWeights, ids: np.ndarray, seed: int, device: torch.device, forced: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per step: x [T, H] (seeded per step) and its routing: the sequence's ids (or, not ``forced``,
    the router's own choice) with the router's weights for them."""
    out = []
    dtype = torch_dtype(spec.act_dtype)
    for s, step in enumerate(ids):
        gen = torch.Generator(device=device).manual_seed(seed + 1_000_003 * s)
        x = torch.randn(step.shape[0], spec.hidden_size, generator=gen, device=device).to(dtype)
        chosen = torch.from_numpy(step).to(device) if forced else None
        out.append((x, *route_tokens(x, weights, spec, chosen)))
    return out


class OffloadedLayer:
    """One (C, policy) run of the sequence with ``backend``; ``step(s)`` runs step s, timed."""

    def __init__(
        self,
        spec: MoESpec,
        weights: MoEWeights,
        tier: DiskTier,
        backend: str,
        accesses: list[list[Access]],
        capacity: int,
    ) -> None:
        self.spec, self.weights, self.tier, self.accesses = spec, weights, tier, accesses
        self.fast = FastTier(spec, weights, capacity)
        self.backend = get_backend(backend)
        self.shared = None
        if spec.num_shared_experts:
            s_spec = shared_spec(spec)
            self.shared = (s_spec, shared_weights_as_layer(weights), get_backend(backend))
        self.fetched_bytes = 0

    def step(
        self, s: int, x: torch.Tensor, ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, float, float]:
        """(output, fetch seconds, compute seconds) of step s."""
        self.tier.drop()
        fetch = compute = 0.0
        k = ids.shape[1]
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        flat_ids, flat_w = ids.reshape(-1), topk_weights.reshape(-1)
        for chunk in chunks(self.accesses[s], self.fast.capacity):
            slots = {}
            start = time.perf_counter()
            for a in chunk:
                slots[a.expert] = slot = self.fast.place(a)
                if not a.hit:
                    into = expert_tensors(self.fast.weights, slot)
                    self.fetched_bytes += self.tier.fetch(a.expert, into)
            if any(not a.hit for a in chunk):
                self.backend.forget(self.fast.weights)  # its slots were overwritten
            middle = time.perf_counter()
            pairs = torch.cat([torch.nonzero(flat_ids == e).flatten() for e in slots])
            slot_ids = torch.tensor([slots[int(e)] for e in flat_ids[pairs].tolist()], device=x.device)
            rows, w = x[pairs // k], flat_w[pairs, None]
            if self.spec.weights_on_input:
                rows, w = rows * w.to(rows.dtype), torch.ones_like(w)
            out = self.backend.forward(rows, self.fast.weights, self.fast.spec, slot_ids[:, None], w)
            y.index_add_(0, pairs // k, out.float())
            fetch += middle - start
            compute += time.perf_counter() - middle
        start = time.perf_counter()
        if self.shared is not None:
            s_spec, s_weights, backend = self.shared
            s_ids, gates = shared_as_routing(x, self.weights, self.spec)
            y += backend.forward(x, s_weights, s_spec, s_ids, gates).float()
        compute += time.perf_counter() - start
        return y.to(x.dtype), fetch, compute


def run_offload(
    spec: MoESpec,
    weights: MoEWeights,
    ids: np.ndarray,
    capacities: list[int],
    policies: list[str],
    backend: str,
    folder: Path,
    drop_cache: bool,
    seed: int,
    bandwidth: float,
    on_record: Callable[[dict[str, Any]], None] = lambda r: None,
) -> list[dict[str, Any]]:
    """One record per (C, policy): counts, times, bandwidths (README: Offloaded experts)."""
    device = weights.device
    steps = step_experts(ids)
    inputs = step_inputs(spec, weights, ids, seed, device)
    tier = DiskTier(folder / f"moecap-experts-{os.getpid()}.bin", weights, drop_cache)
    try:
        ceiling = tier.read_ceiling()
        resident = get_backend(backend)
        resident.prepare(weights, spec, ids.shape[1])
        x0, ids0, w0 = inputs[0]
        resident.forward(x0, weights, spec, ids0, w0)  # warm-up, untimed
        resident_out, resident_s = [], []
        for x, step_ids, w in inputs:
            start = time.perf_counter()
            resident_out.append(resident.forward(x, weights, spec, step_ids, w))
            resident_s.append(time.perf_counter() - start)
        compulsory = sum(
            traffic(spec, ids.shape[1], len(e) * spec.expert_weight_bytes).compulsory for e in steps
        )
        records = []
        for capacity in capacities:
            oracle = CacheCounts.of(simulate(steps, capacity, "belady"))
            for policy in policies:
                accesses = simulate(steps, capacity, policy)
                counts = CacheCounts.of(accesses)
                layer = OffloadedLayer(spec, weights, tier, backend, accesses, capacity)
                fetch_s, compute_s, errors = [], [], []
                for s, (x, step_ids, w) in enumerate(inputs):
                    y, f, c = layer.step(s, x, step_ids, w)
                    fetch_s.append(f)
                    compute_s.append(c)
                    errors.append(relative_error(y, resident_out[s].double()))
                if layer.fetched_bytes != sum(counts.misses) * tier.record_bytes:
                    raise RuntimeError("bytes read differ from misses × expert bytes")
                total = sum(fetch_s) + sum(compute_s)
                record = {
                    "tier": "disk (page cache dropped per step)" if drop_cache else "disk (page cache kept)",
                    "cache_experts": capacity,
                    "policy": policy,
                    "backend": backend,
                    "steps": len(steps),
                    "tokens_per_step": int(ids.shape[1]),
                    "hits": sum(counts.hits),
                    "misses": sum(counts.misses),
                    "evictions": sum(counts.evictions),
                    "fetched_bytes": layer.fetched_bytes,
                    "expert_bytes": tier.record_bytes,
                    "hit_rate": counts.hit_rate,
                    "oracle_hit_rate": oracle.hit_rate,
                    "fetch_time_s": sum(fetch_s),
                    "compute_time_s": sum(compute_s),
                    "overlap_time_s": 0.0,
                    "step_time_s": total / len(steps),
                    "resident_step_time_s": sum(resident_s) / len(steps),
                    "fetch_bandwidth_bytes_per_s": layer.fetched_bytes / sum(fetch_s)
                    if sum(fetch_s)
                    else None,
                    "tier_read_ceiling_bytes_per_s": float(np.median(ceiling)),
                    "tier_read_ceiling_trials": ceiling,
                    "s_mbu": compulsory / total / bandwidth,
                    "resident_s_mbu": compulsory / sum(resident_s) / bandwidth,
                    "max_rel_error_vs_resident": max(errors),
                    "per_step": [
                        {
                            "hits": h,
                            "misses": m,
                            "evictions": v,
                            "fetch_s": f,
                            "compute_s": c,
                            "resident_s": r,
                        }
                        for h, m, v, f, c, r in zip(
                            counts.hits,
                            counts.misses,
                            counts.evictions,
                            fetch_s,
                            compute_s,
                            resident_s,
                            strict=True,
                        )
                    ],
                }
                records.append(record)
                on_record(record)
        return records
    finally:
        tier.close()
