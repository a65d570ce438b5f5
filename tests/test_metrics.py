"""Bytes, FLOPs and utilization against the formulas written out by hand, on real presets."""

from __future__ import annotations

import random

import pytest

from moecap_kernels.metrics import load_imbalance, traffic, utilization, work
from moecap_kernels.spec import load_preset

PRESETS = ["mixtral-8x7b", "qwen1.5-moe-a2.7b", "deepseek-v3", "olmoe-1b-7b", "deepseek-v2-lite"]


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
    bytes_ = activated * p_e * b + n_shared * p_s * b + e * h * b + 2 * tokens * h * b
    flops = sum(n * 2 * p_e for n in per_expert) + tokens * n_shared * 2 * p_s + 2 * tokens * h * e
    dense_bytes = e * p_e * b + n_shared * p_s * b + e * h * b + 2 * tokens * h * b
    dense_flops = tokens * e * 2 * p_e + tokens * n_shared * 2 * p_s + 2 * tokens * h * e
    return s, activated, per_expert, bytes_, flops, dense_bytes, dense_flops


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_bytes_and_flops_match_hand_formulas(name, tokens):
    rng = random.Random(tokens)
    spec = load_preset(name)
    ids = [rng.sample(range(spec.num_experts), spec.top_k) for _ in range(tokens)]
    s, activated, per_expert, bytes_, flops, dense_bytes, dense_flops = by_hand(name, ids)
    t = traffic(s, tokens, activated * s.expert_weight_bytes)
    w = work(s, tokens, sum(n * 2 * s.params_per_expert for n in per_expert))
    assert (t.compulsory, t.dense, w.useful, w.dense) == (bytes_, dense_bytes, flops, dense_flops)
    assert all(isinstance(v, int) for v in (t.compulsory, t.dense, w.useful, w.dense))


def test_utilization_ratios_and_bound():
    s = load_preset("mixtral-8x7b")
    t = traffic(s, 1, 2 * s.expert_weight_bytes)
    w = work(s, 1, 2 * 2 * s.params_per_expert)
    u = utilization(t, w, seconds=0.01, peak_bandwidth=4.8e12, peak_flops=989e12)
    assert u.s_mbu == pytest.approx(t.compulsory / 0.01 / 4.8e12)
    assert u.s_mfu == pytest.approx(w.useful / 0.01 / 989e12)
    assert u.mbu_dense > u.s_mbu  # 8 experts read, 2 needed
    assert u.bound == "memory" and u.arithmetic_intensity < 2
    assert u.roofline_time_s == pytest.approx(t.compulsory / 4.8e12)
    big = utilization(t, work(s, 1, 10**18), seconds=1.0, peak_bandwidth=4.8e12, peak_flops=989e12)
    assert big.bound == "compute"


def test_load_imbalance():
    assert load_imbalance([2, 2, 2, 2]) == 1.0
    assert load_imbalance([8, 0, 0, 0]) == 4.0
    assert load_imbalance([0, 0]) == 0.0
