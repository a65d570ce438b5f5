"""Checks that need a CUDA GPU (skipped elsewhere): every backend in bf16/fp16 against float64, the
compiled CUDA counters and alignment against their CPU twins, Triton kernel counters and FLOPs."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from torch.utils.flop_counter import FlopCounterMode

from moecap_kernels import _ext
from moecap_kernels.backends import get_backend
from moecap_kernels.counters import CountAccumulator
from moecap_kernels.dtypes import torch_dtype
from moecap_kernels.kernels.align import align_tokens, align_tokens_torch
from moecap_kernels.reference import reference_forward, relative_error
from moecap_kernels.routing import parse_routing, route_tokens, synthetic_ids
from moecap_kernels.spec import MoESpec, load_preset
from moecap_kernels.weights import random_weights

CUDA = torch.device("cuda")
TOLERANCE = {"bfloat16": 1e-2, "float16": 1e-2, "float32": 1e-4}
LAYERS = {
    "gated": dict(hidden_size=512, intermediate_size=384, num_experts=16, top_k=4),
    "odd-sizes": dict(hidden_size=328, intermediate_size=200, num_experts=12, top_k=3),
    "shared": dict(hidden_size=256, intermediate_size=128, num_experts=32, top_k=8, num_shared_experts=1,
                   shared_intermediate_size=320),
    "gelu-not-gated": dict(hidden_size=256, intermediate_size=192, num_experts=8, top_k=2, gated=False,
                           activation="gelu"),
}  # fmt: skip


def setup(layer: str, dtype: str, tokens: int, seed: int = 0):
    spec = MoESpec(name=layer, **LAYERS[layer]).with_dtype(dtype)
    weights = random_weights(spec, CUDA, seed=seed)
    gen = torch.Generator(device=CUDA).manual_seed(seed + 1)
    x = torch.randn(tokens, spec.hidden_size, generator=gen, device=CUDA).to(torch_dtype(dtype))
    ids, w = route_tokens(x, weights, spec)
    return spec, weights, x, ids, w


@pytest.mark.parametrize("backend", ["loop", "grouped", "triton"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("tokens", [1, 37, 512])
def test_backends_match_float64_on_gpu(backend, dtype, layer, tokens):
    spec, weights, x, ids, w = setup(layer, dtype, tokens)
    y = get_backend(backend).forward(x, weights, spec, ids, w)
    assert y.dtype == x.dtype and y.device.type == "cuda"
    assert relative_error(y, reference_forward(x, weights, spec, ids, w)) < TOLERANCE[dtype]


@pytest.mark.parametrize("tokens", [1, 64, 4096])
def test_triton_counters_and_flops_on_gpu(tokens):
    spec, weights, x, ids, w = setup("gated", "bfloat16", tokens)
    backend = get_backend("triton")
    kernel = backend.kernel_counters(x, weights, spec, ids, w)
    per_expert = torch.bincount(ids.flatten().cpu(), minlength=spec.num_experts).tolist()
    block = kernel["block_m"]
    blocks = sum(-(-n // block) for n in per_expert)
    assert kernel["padded_rows"] == blocks * block - tokens * spec.top_k
    assert kernel["issued_weight_bytes"] == blocks * spec.expert_weight_bytes
    assert kernel["executed_flops"] == blocks * block * 2 * spec.params_per_expert
    with FlopCounterMode(display=False) as counter:
        backend.forward(x, weights, spec, ids, w)
    assert counter.get_total_flops() == tokens * spec.top_k * 2 * spec.params_per_expert


def test_triton_deterministic_combine_is_reproducible():
    spec, weights, x, ids, w = setup("shared", "bfloat16", 300)
    backend = get_backend("triton")
    backend.deterministic = True
    first = backend.forward(x, weights, spec, ids, w)
    assert torch.equal(first, backend.forward(x, weights, spec, ids, w))


@pytest.mark.parametrize("routing", ["uniform", "hot:1", "zipf:1.5"])
@pytest.mark.parametrize("tokens", [1, 255, 4096])
def test_cuda_counters_and_alignment_match_cpu(routing, tokens):
    assert _ext.has_op("count_routing", "cuda"), _ext.extension_status()
    spec = load_preset("deepseek-v3")
    choice = parse_routing(routing if routing != "hot:1" else f"hot:{spec.top_k}")
    ids = synthetic_ids(choice, tokens, spec, seed=tokens)
    on_gpu, on_cpu = CountAccumulator(spec, CUDA), CountAccumulator(spec, "cpu")
    for _ in range(3):
        on_gpu.add(ids.to(CUDA))
        on_cpu.add(ids)
    assert on_gpu.read() == on_cpu.read()
    for block_m in (16, 64):
        got, want = (
            align_tokens(ids.to(CUDA), spec.num_experts, block_m),
            align_tokens_torch(ids, spec.num_experts, block_m),
        )
        assert torch.equal(got.sorted_pair_ids.cpu(), want.sorted_pair_ids)
        assert torch.equal(got.block_expert_ids.cpu(), want.block_expert_ids)
        assert torch.equal(got.num_padded.cpu(), want.num_padded)


@pytest.mark.parametrize(
    "fmt", ["int8", "w8a8", "int4-g128", "int4-g64-zp", "fp8-tensor", "fp8-channel", "fp8-block", "mxfp4"]
)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("tokens", [1, 37, 512])
def test_triton_quantized_matches_dequantized_float64_on_gpu(fmt, dtype, tokens):
    """Compiled kernels dequantizing in their K loop, against the float64 layer with the dequantized
    weights (the interpreter tests in test_triton_quant.py check the same on the CPU)."""
    from moecap_kernels.quant.layer import in_format

    spec = MoESpec(name="q", **LAYERS["shared"]).with_dtype(dtype).with_format(fmt)
    weights = in_format(random_weights(spec, CUDA, seed=2), spec)
    gen = torch.Generator(device=CUDA).manual_seed(3)
    x = torch.randn(tokens, spec.hidden_size, generator=gen, device=CUDA).to(torch_dtype(dtype))
    ids, w = route_tokens(x, weights, spec)
    y = get_backend("triton").forward(x, weights, spec, ids, w)
    assert y.dtype == x.dtype and y.isfinite().all()
    assert relative_error(y, reference_forward(x, weights, spec, ids, w, dequantized=True)) < 1e-2


# --- kernel time: CUDA graphs, the row's own device and stream ----------------------------------


def _graph_row(backend_name: str, device: torch.device = CUDA):
    import dataclasses

    from moecap_kernels import hardware
    from moecap_kernels.graphs import capture_graphs
    from moecap_kernels.runner import ProfileRequest, Row, Scenario, profile_row

    spec = MoESpec(name="graph", **LAYERS["shared"]).with_dtype("bfloat16")
    request = ProfileRequest(spec, (Scenario("decode", 8),), (backend_name,), parse_routing("router"), device,
                             warmup=3, reps=10, measure_energy=False)  # fmt: skip
    weights = random_weights(spec, device, seed=1)
    row = Row(request, weights, request.scenarios[0], 8)
    info = dataclasses.replace(hardware.detect_device(device), llc_bytes=1 << 20)
    peaks = hardware.Peaks(4e12, 1e15, "bfloat16", "given", "given")
    return profile_row(
        request, weights, row, request.scenarios[0], backend_name, info, peaks, capture=capture_graphs
    )


def test_triton_is_timed_by_graph_replays_with_its_eager_time_beside():
    from moecap_kernels.graphs import REPLAYS

    result = _graph_row("triton")
    assert result.time.method == REPLAYS and len(result.time.samples_s) == 10
    assert result.extras["time_s_eager"]["reps"] == 10
    assert result.counts.forwards == 1 and result.counts.routed_pairs == 8 * 4  # per forward, from replays
    assert result.rel_error < 1e-2  # the replayed output is the layer's


def test_a_host_syncing_backend_stays_eager_and_says_why():
    from moecap_kernels.timing import EAGER_CUDA

    result = _graph_row("loop")
    assert result.time.method == EAGER_CUDA and "waits for the host" in result.extras["cuda_graph"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_events_time_the_rows_own_device():
    second = torch.device("cuda", 1)
    with torch.cuda.device(0):  # the current device is another GPU than the row's
        result = _graph_row("triton", second)
    assert result.time.median > 1e-6 and result.extras["time_s_eager"]["median"] > 1e-6


# --- the csrc kernels through CuPy/NVRTC -----------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 255, 4096])
def test_cupy_kernels_match_the_extension_and_torch(tokens):
    from moecap_kernels import cupy_kernels

    if not cupy_kernels.available():
        pytest.skip(f"the CuPy path cannot run here: {cupy_kernels.status()}")
    spec = load_preset("deepseek-v3")
    ids = synthetic_ids(parse_routing("zipf:1.2"), tokens, spec, seed=tokens).to(CUDA)
    stats = torch.zeros(spec.num_experts + 6, dtype=torch.int64, device=CUDA)
    for _ in range(2):
        cupy_kernels.count_routing(
            ids, stats, spec.num_experts, spec.expert_weight_bytes, 2 * spec.params_per_expert
        )
    reference = CountAccumulator(spec, "cpu")
    for _ in range(2):
        reference.add(ids.cpu())
    assert torch.equal(stats.cpu(), reference.stats)
    for block_m in (16, 64):
        got = cupy_kernels.align_tokens(ids, spec.num_experts, block_m)
        want = align_tokens_torch(ids.cpu(), spec.num_experts, block_m)
        assert all(torch.equal(g.cpu(), w) for g, w in zip(got, (want.sorted_pair_ids, want.block_expert_ids,
                                                                  want.num_padded), strict=True))  # fmt: skip
