"""Bytes, FLOPs and utilization against the formulas written out by hand, on real presets."""

from __future__ import annotations

import random

import pytest
import torch

from moecap_kernels.counters import CountAccumulator, Counts
from moecap_kernels.metrics import Traffic, Work, load_imbalance, traffic, utilization, work
from moecap_kernels.spec import MoESpec, load_preset

PRESETS = [
    "mixtral-8x7b",
    "qwen1.5-moe-a2.7b",
    "deepseek-v3",
    "olmoe-1b-7b",
    "deepseek-v2-lite",
    "gpt-oss-20b",
]


def by_hand(name: str, ids: list[list[int]]):
    """The DESIGN formulas, spelled out with plain loops over a routing."""
    s = load_preset(name)
    h, f, e, fs, n_shared = (
        s.hidden_size,
        s.intermediate_size,
        s.num_experts,
        s.shared_intermediate_size,
        s.num_shared_experts,
    )
    b = 2  # bfloat16 weights and activations
    tokens = len(ids)
    per_expert = [0] * e
    for row in ids:
        for expert in row:
            per_expert[expert] += 1
    activated = sum(1 for n in per_expert if n > 0)
    p_e, p_s = 3 * h * f, 3 * h * fs
    bias_e = (2 * f + h) if s.expert_bias else 0  # gate/up bias 2F and down bias H per expert
    router = e * h + (e if s.router_bias else 0)
    correction = 4 * e if s.selection_bias else 0  # float32 correction bias, read to choose
    gate = n_shared * h if s.shared_expert_gate else 0  # one gate vector per shared expert
    always = n_shared * p_s * b + router * b + correction + gate * b + 2 * tokens * h * b
    bytes_ = activated * (p_e + bias_e) * b + always
    dense_bytes = e * (p_e + bias_e) * b + always
    always_flops = tokens * n_shared * 2 * p_s + 2 * tokens * h * e + 2 * tokens * gate
    flops = sum(n * 2 * p_e for n in per_expert) + always_flops
    dense_flops = tokens * e * 2 * p_e + always_flops
    return s, activated, per_expert, bytes_, flops, dense_bytes, dense_flops


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_bytes_and_flops_match_hand_formulas(name, tokens):
    rng = random.Random(tokens)
    spec = load_preset(name)
    ids = [rng.sample(range(spec.num_experts), spec.top_k) for _ in range(tokens)]
    s, activated, per_expert, bytes_, flops, dense_bytes, dense_flops = by_hand(name, ids)
    counts = _count(s, ids)
    assert (counts.activated_experts, list(counts.tokens_per_expert)) == (activated, per_expert)
    t = traffic(s, tokens, counts.expert_weight_bytes)
    w = work(s, tokens, counts.expert_flops)
    assert (t.compulsory, t.dense, w.useful, w.dense) == (bytes_, dense_bytes, flops, dense_flops)
    assert all(isinstance(v, int) for v in (t.compulsory, t.dense, w.useful, w.dense))


def _count(spec: MoESpec, ids: list[list[int]]) -> Counts:
    """One forward's counts of routing ``ids``, from the counters' pure-torch path."""
    acc = CountAccumulator(spec, "cpu", use_extension=False)
    acc.add(torch.tensor(ids, dtype=torch.int64))
    return acc.read().per_forward()


def test_utilization_of_a_tiny_layer_by_hand():
    # H=4, F=2, E=4, one shared expert with F_s=2, bf16 (2 bytes): P_e = P_s = 3·4·2 = 24 params.
    spec = MoESpec(
        name="tiny",
        hidden_size=4,
        intermediate_size=2,
        num_experts=4,
        top_k=2,
        num_shared_experts=1,
        shared_intermediate_size=2,
    )
    counts = _count(spec, [[0, 1], [1, 2]])  # 2 tokens, experts 0, 1, 2 hit, 4 routed pairs
    t = traffic(spec, 2, counts.expert_weight_bytes)
    w = work(spec, 2, counts.expert_flops)
    # bytes: experts 3·48, shared 48, router 4·4·2, activations 2·2·4·2 (in and out); dense: 4·48 experts
    assert t == Traffic(expert_weights=144, shared_weights=48, router_weights=32, activations=32, dense=304)
    assert t.compulsory == 256
    # FLOPs: 4 pairs · 2·24, 2 tokens · 2·24 shared, 2 tokens · 2·16 router; dense: 2 tokens · 4 · 2·24
    assert w == Work(experts=192, shared=96, router=64, dense=544)
    assert w.useful == 352

    u = utilization(t, w, seconds=1e-6, peak_bandwidth=1e9, peak_flops=4e9)
    assert u.s_mbu == pytest.approx(0.256)  # 256 B / 1 µs / 1 GB/s
    assert u.s_mfu == pytest.approx(0.088)  # 352 FLOP / 1 µs / 4 GFLOP/s
    assert u.mbu_dense == pytest.approx(0.304)
    assert u.mfu_dense == pytest.approx(0.136)
    assert u.arithmetic_intensity == pytest.approx(1.375)  # 352 / 256
    assert u.ridge_point == pytest.approx(4.0)
    assert u.bound == "memory"
    assert u.roofline_time_s == pytest.approx(2.56e-7)  # 256 B at 1 GB/s

    slow = utilization(t, w, seconds=1e-6, peak_bandwidth=1e9, peak_flops=1e8)
    assert slow.ridge_point == pytest.approx(0.1) and slow.bound == "compute"
    assert slow.s_mfu == pytest.approx(3.52)
    assert slow.roofline_time_s == pytest.approx(3.52e-6)  # 352 FLOP at 0.1 GFLOP/s


def test_load_imbalance():
    assert load_imbalance([2, 2, 2, 2]) == 1.0
    assert load_imbalance([8, 0, 0, 0]) == 4.0
    assert load_imbalance([0, 0]) == 0.0
