"""Bytes, FLOPs and utilization against the formulas written out by hand, on real presets."""

from __future__ import annotations

import random

import pytest
import torch

from moecap_kernels.counters import CountAccumulator, Counts
from moecap_kernels.errors import UserError
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


def matrix_bytes_by_hand(fmt: str, rows: int, cols: int, projection: int, b: int) -> int:
    """One [rows, cols] expert matrix of ``projection``-row projections, format by format."""
    if fmt == "none":
        return rows * cols * b
    if fmt in ("int8", "w8a8", "fp8-channel"):
        return rows * cols + 4 * rows  # 1-byte codes, a float32 scale per row
    if fmt == "fp8-tensor":
        return rows * cols + 4 * (rows // projection)
    if fmt == "fp8-block":
        blocks = (rows // projection) * -(-projection // 128) * -(-cols // 128)
        return rows * cols + 4 * blocks
    if fmt == "mxfp4":
        return rows * cols // 2 + rows * (cols // 32)  # half a byte per code, an e8m0 byte per 32
    group = int(fmt.split("-g")[1].split("-")[0])  # int4-gN[-zp]: float16 scales, 4-bit zero points
    zero_points = rows * -(-(cols // group) // 2) if fmt.endswith("-zp") else 0
    return rows * cols // 2 + 2 * rows * (cols // group) + zero_points


def by_hand(name: str, ids: list[list[int]], fmt: str | None = None):
    """The DESIGN formulas, spelled out with plain loops over a routing (experts in ``fmt``,
    default: the preset's own format)."""
    s = load_preset(name)
    if fmt is not None:
        s = s.with_format(fmt)
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
    expert = matrix_bytes_by_hand(s.weight_format, 2 * f, h, f, b) + matrix_bytes_by_hand(
        s.weight_format, h, f, h, b
    )
    shared = n_shared and matrix_bytes_by_hand(s.weight_format, 2 * fs, h, fs, b) + matrix_bytes_by_hand(
        s.weight_format, h, fs, h, b
    )
    always = n_shared * shared + router * b + correction + gate * b + 2 * tokens * h * b
    bytes_ = activated * (expert + bias_e * b) + always
    dense_bytes = e * (expert + bias_e * b) + always
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


FORMATS = [
    "none",
    "int8",
    "w8a8",
    "int4-g128",
    "int4-g32-zp",
    "fp8-tensor",
    "fp8-channel",
    "fp8-block",
    "mxfp4",
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen1.5-moe-a2.7b", "gpt-oss-20b", "deepseek-v2-lite"])
def test_bytes_in_every_format_match_hand_formulas(name, fmt):
    """Random routings (and every expert hit): an expert's bytes are its codes, scales and zero
    points, exactly; FLOPs do not change with the format."""
    rng = random.Random(fmt)
    preset = load_preset(name)
    group = {"int4-g128": 128, "int4-g32-zp": 32, "mxfp4": 32}.get(fmt, 1)
    if preset.hidden_size % group or preset.intermediate_size % group:  # gpt-oss: H = F = 2880
        with pytest.raises(UserError, match="groups are not padded"):
            preset.with_format(fmt)
        return
    spec = preset.with_format(fmt)
    for tokens in (1, 7, 4 * spec.num_experts):
        ids = [rng.sample(range(spec.num_experts), spec.top_k) for _ in range(tokens)]
        s, _, _, bytes_, flops, dense_bytes, _ = by_hand(name, ids, fmt)
        counts = _count(s, ids)
        t, w = traffic(s, tokens, counts.expert_weight_bytes), work(s, tokens, counts.expert_flops)
        assert (t.compulsory, t.dense, w.useful) == (bytes_, dense_bytes, flops)


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
