"""The ``triton`` backend, run by the Triton interpreter on the CPU: availability, accuracy, counters,
FLOPs and launch configs."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from torch.utils.flop_counter import FlopCounterMode

from moecap_kernels.backends import backend_names, get_backend
from moecap_kernels.backends.base import shared_routing
from moecap_kernels.errors import UserError
from moecap_kernels.kernels import ops
from moecap_kernels.kernels.configs import KernelConfig, config_file_name, get_config, heuristic_config
from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import random_weights
from tests.helpers import per_pair_reference as reference
from tests.helpers import tiny_spec
from tests.test_triton_kernels import TOLERANCE, expected_counters, fixed_order_sum, rel_error

SMALL = KernelConfig(16, 32, 32)


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def make_spec(dtype: str = "float16", **overrides) -> MoESpec:
    """tiny_spec with H = 72 (not a multiple of the blocks) and 6 experts, in ``dtype``."""
    return tiny_spec(**{"hidden_size": 72, "num_experts": 6, **overrides}).with_dtype(dtype)


def routed_inputs(spec: MoESpec, tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, spec.hidden_size, generator=gen).to(getattr(torch, spec.act_dtype))
    ids = torch.stack([torch.randperm(spec.num_experts, generator=gen)[: spec.top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, spec.top_k, generator=gen) + 0.1
    return x, ids, weights


def backend(**options):
    b = get_backend("triton")
    for key, value in options.items():
        setattr(b, key, value)
    return b


def test_registered():
    assert "triton" in backend_names()


def test_availability(monkeypatch):
    b = get_backend("triton")
    cpu = torch.device("cpu")
    assert b.availability(torch.device("cuda"), torch.bfloat16) is None
    monkeypatch.delenv("TRITON_INTERPRET")
    assert b.availability(cpu, torch.float16) == (
        "the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 to run (slowly) on the CPU"
    )
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert b.availability(cpu, torch.float16) is None
    assert b.availability(cpu, torch.float32) is None
    reason = b.availability(cpu, torch.bfloat16)
    assert reason and "bfloat16" in reason and "11584" in reason


LAYERS = {
    "silu": {},
    "gelu": {"activation": "gelu"},
    "not-gated": {"gated": False},
    "shared": {"num_shared_experts": 2, "shared_intermediate_size": 24},
    "k=E": {"num_experts": 3, "top_k": 3},
    "gelu-tanh": {"activation": "gelu_tanh"},
    # gpt-oss: expert biases and the clamped SwiGLU (a limit the activations cross)
    "gpt-oss": {"expert_bias": True, "activation": "swiglu_oai", "swiglu_limit": 0.5},
    # Llama 4: the routing weight on the input, a plain shared expert
    "llama4": {"weights_on_input": True, "num_shared_experts": 1, "shared_intermediate_size": 24},
    "qwen2-moe": {"num_shared_experts": 1, "shared_intermediate_size": 24, "shared_expert_gate": True},
}


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_forward_matches_float64(layer, dtype, deterministic):
    spec = make_spec(dtype, **LAYERS[layer])
    weights = random_weights(spec, seed=1)
    x, ids, topk_weights = routed_inputs(spec, 11, seed=2)
    # Deterministic-algorithms mode makes torch.empty fill with NaN: an unwritten output would show.
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        y = backend(deterministic=deterministic, config=SMALL).forward(x, weights, spec, ids, topk_weights)
    finally:
        torch.use_deterministic_algorithms(was)
    assert y.dtype == x.dtype and y.shape == x.shape and y.isfinite().all()
    assert rel_error(y, reference(x, weights, spec, ids, topk_weights)) < TOLERANCE[x.dtype]


def test_heuristic_config_forward():
    spec = make_spec("float32", num_shared_experts=1, shared_intermediate_size=32)
    weights = random_weights(spec, seed=4)
    x, ids, topk_weights = routed_inputs(spec, 5, seed=5)
    b = backend()
    y = b.forward(x, weights, spec, ids, topk_weights)
    assert b.last_config.source.startswith("heuristic")
    assert rel_error(y, reference(x, weights, spec, ids, topk_weights)) < TOLERANCE[x.dtype]


def test_deterministic_forward_is_the_fixed_order_combine():
    """deterministic: per-pair rows summed in pair order then shared order, bit for bit. With k = 3
    the float atomics (here: adds in expert-sorted order) round differently, which the test sees."""
    spec = make_spec("float32", top_k=3, num_shared_experts=1, shared_intermediate_size=32)
    weights = random_weights(spec, seed=6)
    x, ids, topk_weights = routed_inputs(spec, 30, seed=7)
    options = dict(gated=spec.gated, activation=spec.activation, atomic=False)
    routed = ops.fused_experts(x, weights.w_in, weights.w_out, ids, topk_weights, SMALL, **options)
    shared_ids, ones = shared_routing(30, 1, x.device)
    shared = ops.fused_experts(
        x, weights.shared_w_in, weights.shared_w_out, shared_ids, ones, SMALL, **options
    )
    want = fixed_order_sum(routed, shared, spec.top_k, 1)
    got = backend(deterministic=True, config=SMALL).forward(x, weights, spec, ids, topk_weights)
    assert torch.equal(got, want)
    atomic = backend(config=SMALL).forward(x, weights, spec, ids, topk_weights)
    assert not torch.equal(atomic, want)


@pytest.mark.parametrize("gated", [True, False])
def test_kernel_counters_read_and_reset(gated):
    spec = make_spec(
        "float16",
        hidden_size=64,
        intermediate_size=96,
        gated=gated,
        num_shared_experts=1,
        shared_intermediate_size=32,
    )
    weights = random_weights(spec, seed=8)
    x, ids, topk_weights = routed_inputs(spec, 23, seed=9)
    b = backend(count=True, config=SMALL)
    b.forward(x, weights, spec, ids, topk_weights)
    routed = expected_counters(ids, spec.num_experts, 16, spec.params_per_expert, 2)
    shared = expected_counters(torch.zeros(23, 1, dtype=torch.int64), 1, 16, spec.params_per_shared_expert, 2)
    want = [a + b for a, b in zip(routed, shared, strict=True)]
    got = b.read_kernel_counters()
    assert got == {
        "block_m": 16,
        "padded_rows": want[0],
        "executed_flops": want[1],
        "issued_weight_bytes": want[2],
    }
    b.forward(x, weights, spec, ids, topk_weights)  # accumulates until reset
    assert b.read_kernel_counters()["executed_flops"] == 2 * want[1]
    b.reset_kernel_counters()
    assert b.read_kernel_counters() == {
        "block_m": 16,
        "padded_rows": 0,
        "executed_flops": 0,
        "issued_weight_bytes": 0,
    }


def test_counting_off_leaves_counters_alone():
    spec = make_spec("float16")
    weights = random_weights(spec, seed=10)
    x, ids, topk_weights = routed_inputs(spec, 4, seed=11)
    b = backend(count=True, config=SMALL)
    b.forward(x, weights, spec, ids, topk_weights)  # creates the counter buffer and fills it
    counted = b.read_kernel_counters()
    assert counted["executed_flops"] > 0
    b.count = False
    b.forward(x, weights, spec, ids, topk_weights)
    assert b.read_kernel_counters() == counted


@pytest.mark.parametrize("deterministic", [False, True])
def test_flop_counter_over_forward_is_useful_flops(deterministic):
    spec = make_spec("float16", num_shared_experts=2, shared_intermediate_size=24)
    weights = random_weights(spec, seed=12)
    tokens = 9
    x, ids, topk_weights = routed_inputs(spec, tokens, seed=13)
    with FlopCounterMode(display=False) as counter:
        backend(deterministic=deterministic, config=SMALL).forward(x, weights, spec, ids, topk_weights)
    useful = (
        2 * tokens * spec.top_k * spec.params_per_expert
        + 2 * tokens * spec.num_shared_experts * spec.params_per_shared_expert
    )
    assert counter.get_total_flops() == useful


# --- configs ---------------------------------------------------------------------------------
def test_heuristic_block_m_follows_rows_per_expert():
    decode = heuristic_config(4, 64, 8, 4096, 1408, elem_bytes=2)
    prefill = heuristic_config(8192, 64, 8, 4096, 1408, elem_bytes=2)
    assert decode.block_m == 16 and prefill.block_m in (64, 128)
    for cfg in (decode, prefill):
        stage = (cfg.block_m * cfg.block_k + 2 * cfg.block_k * cfg.block_n) * 2
        assert cfg.num_stages * stage <= 227 * 1024


def test_tuned_config_file_is_used(tmp_path):
    name = config_file_name(6, 40, "cpu", "float16")
    assert name == "E=6,N=40,device_name=cpu,dtype=float16.json"
    entry = {"block_m": 32, "block_n": 64, "block_k": 32, "group_m": 1, "num_warps": 4, "num_stages": 2}
    (tmp_path / name).write_text(json.dumps({"1": {**entry, "block_m": 16}, "64": entry}))
    cpu = torch.device("cpu")
    near_small = get_config(3, 6, 2, 72, 40, torch.float16, cpu, folder=str(tmp_path))
    near_large = get_config(50, 6, 2, 72, 40, torch.float16, cpu, folder=str(tmp_path))
    assert near_small.block_m == 16 and near_small.source == f"tuned: {name} (M=1)"
    assert near_large.block_m == 32 and near_large.source == f"tuned: {name} (M=64)"
    fallback = get_config(3, 6, 2, 72, 40, torch.float32, cpu, folder=str(tmp_path))
    assert fallback.source.startswith("heuristic") and "dtype=float32" in fallback.source


def test_malformed_tuned_config(tmp_path):
    name = config_file_name(6, 40, "cpu", "float16")
    (tmp_path / name).write_text(json.dumps({"1": {"block_m": 16}}))
    with pytest.raises(UserError, match="malformed"):
        get_config(1, 6, 2, 72, 40, torch.float16, torch.device("cpu"), folder=str(tmp_path))


def test_config_validation():
    with pytest.raises(UserError, match="power of two"):
        KernelConfig(24, 32, 32)
    assert SMALL.as_list() == [16, 32, 32, 1, 4, 3]
