"""The ``triton`` backend on quantized experts, run by the Triton interpreter on the CPU: every format
it computes against the float64 layer with the dequantized weights (``reference_forward(...,
dequantized=True)``), the kernels one by one with poisoned outputs, w8a8's row quantization, the
in-kernel counters against an independent count of the loads, FLOPs, configs and refusals.

Shapes are tiny (the interpreter runs every program in Python) and chosen per format so that its
groups divide K; fp8-block's F = 136 gives each projection a full and a partial 128-row block and
the down projection a full and a partial 128-column group.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from torch.utils.flop_counter import FlopCounterMode

from moecap_kernels.backends import get_backend
from moecap_kernels.errors import UserError
from moecap_kernels.kernels import ops
from moecap_kernels.kernels.align import align_tokens
from moecap_kernels.kernels.configs import KernelConfig, for_format, format_block_k, get_config
from moecap_kernels.quant.formats import weight_format
from moecap_kernels.quant.layer import in_format
from moecap_kernels.reference import int8_rows, reference_forward, relative_error
from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import random_weights
from tests.helpers import tiny_spec

SMALL = KernelConfig(16, 32, 32)
# Measured on this suite (2 CPU cores, the interpreter): the largest relative errors were 3.4e-7
# (float32) and 3.0e-4 (float16, where h is rounded to float16 between the two GEMMs).
TOLERANCE = {torch.float16: 1e-3, torch.float32: 1e-6}

# (H, F, F_s) per format: multiples of its group along K where it has groups.
SHAPES = {
    "int8": (72, 40, 24),
    "w8a8": (72, 40, 24),
    "int4-g32": (64, 96, 32),
    "int4-g32-zp": (64, 96, 32),
    "int4-g48": (96, 48, 48),  # BLOCK_K 16: three K steps per group
    "int4-g64": (128, 64, 64),
    "int4-g128-zp": (128, 128, 128),
    "fp8-tensor": (72, 40, 24),
    "fp8-channel": (72, 40, 24),
    "fp8-block": (72, 136, 24),
    "mxfp4": (64, 96, 32),
}
FORMATS = list(SHAPES)


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def make_spec(fmt: str, dtype: str, **overrides) -> MoESpec:
    hidden, inter, inter_s = SHAPES[fmt]
    shape = dict(hidden_size=hidden, intermediate_size=inter, num_experts=6, shared_intermediate_size=inter_s)
    return tiny_spec(**{**shape, **overrides}).with_dtype(dtype).with_format(fmt)


def layer(spec: MoESpec, tokens: int, seed: int, ids: torch.Tensor | None = None):
    """Quantized weights, x, routing ids and weights (random ids unless given)."""
    weights = in_format(random_weights(spec, seed=seed), spec)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, spec.hidden_size, generator=gen).to(getattr(torch, spec.act_dtype))
    if ids is None:
        perms = [torch.randperm(spec.num_experts, generator=gen)[: spec.top_k] for _ in range(tokens)]
        ids = torch.stack(perms)
    topk_weights = torch.rand(tokens, spec.top_k, generator=gen) + 0.1
    return weights, x, ids, topk_weights


def forward(spec, weights, x, ids, topk_weights, **options) -> torch.Tensor:
    """The backend's forward with torch.empty filling with NaN: an unwritten output would show."""
    backend = get_backend("triton")
    for key, value in {"config": SMALL, **options}.items():
        setattr(backend, key, value)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return backend.forward(x, weights, spec, ids, topk_weights)
    finally:
        torch.use_deterministic_algorithms(was)


def check_forward(spec, weights, x, ids, topk_weights, **options) -> None:
    y = forward(spec, weights, x, ids, topk_weights, **options)
    assert y.dtype == x.dtype and y.shape == x.shape and y.isfinite().all()
    want = reference_forward(x, weights, spec, ids, topk_weights, dequantized=True)
    assert relative_error(y, want) < TOLERANCE[x.dtype], spec.weight_format


LAYERS = {
    # gpt-oss: expert biases and the clamped SwiGLU (a limit the activations cross)
    "gpt-oss": ({"expert_bias": True, "activation": "swiglu_oai", "swiglu_limit": 0.5}, {}),
    # Llama 4's weights on the input, Qwen2-MoE's gated shared expert, the deterministic combine
    "llama4-shared": (
        {"weights_on_input": True, "num_shared_experts": 1, "shared_expert_gate": True},
        {"deterministic": True},
    ),
}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_matches_dequantized_reference(fmt, name, dtype):
    overrides, options = LAYERS[name]
    spec = make_spec(fmt, dtype, **overrides)
    check_forward(spec, *layer(spec, 11, seed=3), **options)


ROUTINGS = {
    "one-token": ({}, 1, None),
    "one-expert": ({"top_k": 1}, 20, torch.full((20, 1), 4)),  # 20 pairs: two M-blocks of one expert
    "k=E": ({"num_experts": 3, "top_k": 3, "num_shared_experts": 2}, 5, None),
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_edge_routings(fmt, routing):
    overrides, tokens, ids = ROUTINGS[routing]
    dtype = "float32" if routing == "one-expert" else "float16"
    spec = make_spec(fmt, dtype, **overrides)
    check_forward(spec, *layer(spec, tokens, seed=5, ids=ids))


# --- the kernels one by one, outputs poisoned with NaN ---------------------------------------------
def dequantized(matrix, expert: int) -> torch.Tensor:
    return matrix.dequantize(expert, torch.float64)


@pytest.mark.parametrize("fmt", ["int8", "w8a8", "int4-g32-zp", "fp8-block", "mxfp4"])
def test_each_quantized_kernel_writes_exactly_its_rows(fmt):
    spec = make_spec(fmt, "float32")
    weights, x, ids, topk_weights = layer(spec, 13, seed=7)
    q, f, k = weights.quantized, spec.intermediate_size, spec.top_k
    config = for_format(SMALL, spec.fmt)
    cfg = config.as_list()
    routing = align_tokens(ids, spec.num_experts, config.block_m)
    layout = (routing.sorted_pair_ids, routing.block_expert_ids, routing.num_padded)
    counters = torch.zeros(3, dtype=torch.int64)
    a, a_scales = (x, None)
    if spec.fmt.int8_activations:
        a, a_scales = ops.quantize_rows(x, None, 0)
    h = torch.full((routing.max_padded, f), float("nan"))
    ops.launch_gate_up(
        a, q.w_in.codes, h, *layout, counters, k, True, "silu", cfg, False,
        fmt=spec.fmt, scales=q.w_in.scales, zeros=q.w_in.zeros, x_scales=a_scales,
    )  # fmt: skip
    pairs = routing.sorted_pair_ids.tolist()
    for row, pair in enumerate(pairs):
        if pair == ids.numel():  # padding: never written
            assert h[row].isnan().all()
            continue
        e = int(ids.flatten()[pair])
        token = x[pair // k].double()
        if spec.fmt.int8_activations:
            token = int8_rows(token[None])[0]
        pre = dequantized(q.w_in, e) @ token
        want = pre[:f] / (1 + torch.exp(-pre[:f])) * pre[f:]
        assert relative_error(h[row], want) < 1e-6
    if spec.fmt.int8_activations:
        h, h_scales = ops.quantize_rows(h, routing.sorted_pair_ids, ids.numel())
        assert (h_scales[torch.tensor(pairs) == ids.numel()] == 0).all()  # padding rows: zero scale
    else:
        h_scales = None
    rows = torch.full((ids.numel(), spec.hidden_size), float("nan"))
    ops.launch_down(
        h, q.w_out.codes, rows, *layout, topk_weights, counters, cfg, False, False,
        fmt=spec.fmt, scales=q.w_out.scales, zeros=q.w_out.zeros, h_scales=h_scales,
    )  # fmt: skip
    assert rows.isfinite().all()
    assert counters.tolist() == [0, 0, 0]  # COUNT off: nothing counted


def test_quantize_rows_is_the_references_rounding():
    """Per row: scale max|row| / 127 (float32), codes rounded half to even, clamped; padding rows of
    the expert-sorted layout get zeros without being read."""
    gen = torch.Generator().manual_seed(11)
    rows = torch.randn(40, 300, generator=gen) * 10.0 ** torch.randint(-3, 3, (40, 1), generator=gen)
    ties = torch.tensor([127.0, 2.5, -3.5, 0.5, 1.5, -0.5, -126.5, 126.5, 0.0])  # scale exactly 1
    rows[0, : ties.numel()] = ties
    rows[0, ties.numel() :] = 0.0
    rows[1] = 0.0  # an all-zero row: scale 1, codes 0
    codes, scales = ops.quantize_rows(rows, None, 0)
    amax = rows.abs().amax(1)
    want_scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    assert torch.equal(scales, want_scales)
    assert codes[0, : ties.numel()].tolist() == [127, 2, -4, 0, 2, 0, -126, 126, 0]
    assert torch.equal(codes.double() * scales.double()[:, None], int8_rows(rows.double()))
    pair_ids = torch.tensor([3, 99, 0, 99] * 10, dtype=torch.int32)  # 99: padding
    rows[1::2] = float("nan")  # padding rows are never read
    codes, scales = ops.quantize_rows(rows, pair_ids, 40)
    assert (codes[1::2] == 0).all() and (scales[1::2] == 0).all()
    assert torch.equal(scales[0::2], want_scales[0::2])


# --- counters: an independent count of what the kernels load ------------------------------------
def loads_of_tile(fmt, rows: range, projection_rows: int, cols: int, block_k: int, dense_bytes: int) -> int:
    """The weight bytes one program loads for one projection's tile: codes of its rows over K, and
    the distinct scale (row block, group) and zero-point elements of each load, simulated."""
    if not fmt.quantized:
        return len(rows) * cols * dense_bytes
    per = projection_rows if fmt.block_rows == 0 else fmt.block_rows
    codes = len(rows) * cols * fmt.weight_bits // 8
    if not fmt.group_size:  # one load after the K loop
        return codes + len({r // per for r in rows}) * fmt.scale_bytes_each
    steps = range(0, cols, block_k)
    scales = sum(len({(r // per, k0 // fmt.group_size) for r in rows}) for k0 in steps)
    zeros = len(rows) * len(steps) if fmt.zero_points else 0
    return codes + scales * fmt.scale_bytes_each + zeros


def expected_counters(spec: MoESpec, ids: torch.Tensor, experts: int, inter: int, config: KernelConfig):
    """[padding rows, executed FLOPs, issued weight bytes] of one fused_experts call."""
    fmt, hidden, block_m, block_n = spec.fmt, spec.hidden_size, config.block_m, config.block_n
    projections = 2 if spec.gated else 1
    dense = spec.weight_bytes_per_param
    counts = torch.bincount(ids.flatten(), minlength=experts).tolist()
    blocks = sum(-(-n // block_m) for n in counts)
    tiles_in = range(0, inter, block_n)
    tiles_out = range(0, hidden, block_n)
    gate_up = sum(
        loads_of_tile(fmt, range(n, min(n + block_n, inter)), inter, hidden, config.block_k, dense)
        for n in tiles_in
    )
    down = sum(
        loads_of_tile(fmt, range(n, min(n + block_n, hidden)), hidden, inter, config.block_k, dense)
        for n in tiles_out
    )
    params = (projections + 1) * hidden * inter
    return [
        blocks * block_m - ids.numel(),
        blocks * block_m * 2 * params,
        blocks * (projections * gate_up + down),
    ]


@pytest.mark.parametrize(
    ("fmt", "block"),
    [
        ("int8", (16, 32, 32)),
        ("w8a8", (16, 32, 64)),
        ("int4-g32-zp", (16, 64, 64)),  # BLOCK_K fitted to 32
        ("int4-g128-zp", (16, 32, 64)),  # two K steps per group: scales and zero points loaded twice
        ("fp8-tensor", (32, 32, 32)),
        ("fp8-channel", (16, 64, 32)),
        ("fp8-block", (16, 32, 64)),  # 128-row blocks spread over several N tiles
        ("mxfp4", (16, 32, 32)),
    ],
)
def test_counters_count_the_loads(fmt, block):
    spec = make_spec(fmt, "float16", num_shared_experts=1)
    weights, x, ids, topk_weights = layer(spec, 23, seed=9)
    backend = get_backend("triton")
    backend.config = KernelConfig(*block)
    got = backend.kernel_counters(x, weights, spec, ids, topk_weights)
    config = backend.last_config
    assert got["block_m"] == block[0] and config.block_k == format_block_k(spec.fmt, block[2])
    routed = expected_counters(spec, ids, spec.num_experts, spec.intermediate_size, config)
    shared_ids = torch.zeros(23, 1, dtype=torch.int64)
    shared = expected_counters(spec, shared_ids, 1, spec.shared_intermediate_size, config)
    want = [a + b for a, b in zip(routed, shared, strict=True)]
    assert [got[key] for key in ("padded_rows", "executed_flops", "issued_weight_bytes")] == want


@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "mxfp4"])
def test_one_block_per_expert_loads_each_byte_once(fmt):
    """With one M-block per activated expert, per-row scales, and BLOCK_K = the group (no zero
    points), the kernels load exactly the activated experts' bytes: load amplification 1."""
    spec = make_spec(fmt, "float16")
    weights, x, ids, topk_weights = layer(spec, 5, seed=13)  # 10 pairs over 6 experts: < 16 each
    backend = get_backend("triton")
    backend.config = KernelConfig(16, 32, 32)
    got = backend.kernel_counters(x, weights, spec, ids, topk_weights)["issued_weight_bytes"]
    per_expert = sum(spec.fmt.matrix_bytes(*shape[:3], 2) for shape in spec.matrix_shapes()[:2])
    assert got == len(torch.unique(ids)) * per_expert


# --- FLOPs, ops, configs, refusals -----------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int4-g64", "w8a8"])
def test_flop_counter_counts_the_dense_useful_flops(fmt):
    spec = make_spec(fmt, "float16", num_shared_experts=1)
    weights, x, ids, topk_weights = layer(spec, 9, seed=15)
    with FlopCounterMode(display=False) as counter:
        forward(spec, weights, x, ids, topk_weights)
    useful = (
        2
        * 9
        * (spec.top_k * spec.params_per_expert + spec.num_shared_experts * spec.params_per_shared_expert)
    )
    assert counter.get_total_flops() == useful


def test_quantized_ops_pass_opcheck():
    spec = make_spec("int4-g32-zp", "float16")
    weights, x, ids, topk_weights = layer(spec, 5, seed=17)
    q = weights.quantized
    routing = align_tokens(ids, spec.num_experts, 16)
    layout = (routing.sorted_pair_ids, routing.block_expert_ids, routing.num_padded)
    counters = torch.zeros(3, dtype=torch.int64)
    cfg = SMALL.as_list()
    w_in = (q.w_in.codes, q.w_in.scales, q.w_in.zeros)
    gate_up_args = (x, *w_in, *layout, counters, spec.top_k, True, "silu", spec.weight_format, cfg, True)
    # Padding rows of h are left unwritten (never read), as the dense op's are.
    torch.library.opcheck(
        ops.moe_gate_up_q,
        gate_up_args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    h = ops.moe_gate_up_q(*gate_up_args)
    w_out = (q.w_out.codes, q.w_out.scales, q.w_out.zeros)
    for atomic in (True, False):
        args = (h, *w_out, *layout, topk_weights, counters, spec.weight_format, cfg, atomic, True)
        torch.library.opcheck(ops.moe_down_q, args)
    torch.library.opcheck(ops.quantize_rows, (h, routing.sorted_pair_ids, ids.numel()))


def test_launchers_refuse_mismatched_weights():
    spec = make_spec("int4-g32", "float16")
    weights, x, ids, _ = layer(spec, 3, seed=19)
    q = weights.quantized
    routing = align_tokens(ids, spec.num_experts, 16)
    layout = (routing.sorted_pair_ids, routing.block_expert_ids, routing.num_padded)
    h = torch.empty(routing.max_padded, spec.intermediate_size, dtype=x.dtype)
    counters = torch.zeros(3, dtype=torch.int64)

    def launch(block_k: int = 32, fmt: str = "int4-g32", scales=q.w_in.scales):
        cfg = KernelConfig(16, 32, block_k).as_list()
        ops.launch_gate_up(
            x, q.w_in.codes, h, *layout, counters, spec.top_k, True, "silu", cfg, False,
            fmt=weight_format(fmt), scales=scales,
        )  # fmt: skip

    with pytest.raises(ValueError, match="must divide its group"):
        launch(block_k=64)
    with pytest.raises(ValueError, match=r"scales must be torch\.float16"):
        launch(scales=q.w_in.scales.float())
    with pytest.raises(ValueError, match=r"codes must be torch\.int8"):
        launch(fmt="int8")


def test_configs_fit_the_groups(tmp_path):
    cpu = torch.device("cpu")
    shape = (4, 64, 8, 4096, 1408)  # decode: the heuristic asks for BLOCK_K 128
    assert get_config(*shape, torch.float16, cpu, folder=str(tmp_path)).block_k == 128
    for fmt, block_k in (
        ("mxfp4", 32),
        ("int4-g128", 128),
        ("int4-g48", 16),
        ("fp8-block", 128),
        ("int8", 128),
    ):
        config = get_config(
            *shape, torch.float16, cpu, folder=str(tmp_path), weight_format=weight_format(fmt)
        )
        assert config.block_k == block_k, fmt
        assert "weight_format=" + fmt in config.source and (block_k == 128) == (
            "block_k" not in config.source
        )
    with pytest.raises(UserError, match="multiples of 16"):
        format_block_k(weight_format("int4-g40"), 64)


def test_supports_and_refusals():
    backend = get_backend("triton")
    for fmt in ("none", "int8", "w8a8", "int4-g128", "int4-g64-zp", "fp8-tensor", "fp8-channel", "fp8-block"):
        assert backend.supports(tiny_spec(hidden_size=128, intermediate_size=128).with_format(fmt)) is None
    assert backend.supports(tiny_spec(hidden_size=64, intermediate_size=64).with_format("mxfp4")) is None
    odd = tiny_spec(hidden_size=80, intermediate_size=40).with_format("int4-g40")
    reason = backend.supports(odd)
    assert reason and "not a multiple of 16" in reason and "\n" not in reason
    long = tiny_spec(hidden_size=1 << 18, intermediate_size=64).with_format("w8a8")
    assert "int32" in backend.supports(long)
    spec = make_spec("int8", "float16")
    dense = random_weights(spec, seed=1)  # no quantized experts: said in one line
    x = torch.zeros(2, spec.hidden_size, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"weights\.quantized"):
        backend.forward(x, dense, spec, torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 2))


# --- compiled mode: the quantized kernels build for Hopper (sm_90) and Ampere (sm_80) --------------
SCALE_POINTER = {"float32": "*fp32", "float16": "*fp16", "e8m0": "*u8"}


def quantized_compile(kernel, fmt_name: str, arch: int, block: tuple[int, int, int], **flags) -> str:
    """The PTX of the gate/up or down ``kernel`` compiled for ``fmt_name``'s experts with bf16
    activations (w8a8: int8 codes in, and h in float32 out of gate/up)."""
    from moecap_kernels.kernels.grouped_gemm import CODE_KINDS, gate_up_kernel
    from tests.triton_compile import LAYOUT_POINTERS, compile_ptx

    fmt = weight_format(fmt_name)
    codes = "*i8" if fmt.int8_activations else "*bf16"
    if kernel is gate_up_kernel:
        activations = {"x_ptr": codes, "h_ptr": "*fp32" if fmt.int8_activations else "*bf16"}
        strides = ("stride_xh", "stride_wh", "stride_hf")
    else:
        activations = {"h_ptr": codes, "out_ptr": "*fp32"}
        strides = ("stride_hf", "stride_wf", "stride_oh")
    pointers = {
        **activations,
        "w_ptr": "*i8" if fmt.codes == "int8" else "*u8",
        "bias_ptr": "*bf16",
        "pair_weights_ptr": "*fp32",
        "scale_ptr": SCALE_POINTER[fmt.scale_dtype],
        "zero_ptr": "*u8",
        "a_scale_ptr": "*fp32",
        "alpha": "fp32",
        "limit": "fp32",
        **LAYOUT_POINTERS,
    }
    block_m, block_n, block_k = block
    constexprs = dict(
        TOP_K=8,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=format_block_k(fmt, block_k),
        GROUP_M=8,
        HAS_BIAS=False,
        INPUT_PRECISION=None,
        COUNT=False,
        CODES=CODE_KINDS[fmt.codes],
        GROUP=fmt.group_size,
        ROW_BLOCK=fmt.block_rows,
        ZERO_POINTS=fmt.zero_points,
        INT8_ACT=fmt.int8_activations,
        **flags,
    )
    return compile_ptx(kernel, pointers, constexprs, strides, num_warps=4, num_stages=3, arch=arch)


COMPILED_FORMATS = ["int8", "w8a8", "int4-g128", "int4-g128-zp", "fp8-tensor", "fp8-block", "mxfp4"]


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("fmt", COMPILED_FORMATS)
def test_quantized_kernels_compile_for_gpus(monkeypatch, fmt, arch):
    """Both kernels compile for sm_90 and sm_80 with bf16 activations (int8 for w8a8); the dot
    products run on tensor cores (wgmma on Hopper at BLOCK_M 64, mma.sync on Ampere), in int8
    for w8a8 and in bf16 for every weight-only format."""
    from moecap_kernels.kernels.grouped_gemm import down_kernel, gate_up_kernel

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set to silence triton 3.9
    block = (64, 64, 128)
    gate_up = quantized_compile(
        gate_up_kernel, fmt, arch, block, GATED=True, ACTIVATION=0, WEIGHTS_ON_INPUT=False
    )
    down = quantized_compile(down_kernel, fmt, arch, block, ATOMIC=True)
    mma = "wgmma.mma_async" if arch == 90 else "mma.sync"
    operand = "s8" if weight_format(fmt).int8_activations else "bf16"
    for ptx in (gate_up, down):
        instructions = [line for line in ptx.splitlines() if mma in line]
        assert instructions and all(operand in line for line in instructions), fmt
