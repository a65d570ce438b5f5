"""The Triton grouped GEMM kernels, run by the Triton interpreter on the CPU, against float64.

The interpreter is switched on for this module only (a fixture): the kernels are jitted at their
first launch (kernels/lazy_jit.py), so it does not matter who imported triton first. Operands are
float16/float32 only: the interpreter's bfloat16 dot is wrong (triton issue 11584).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("triton")

from torch.utils.flop_counter import FlopCounterMode

from moecap_kernels.kernels import ops
from moecap_kernels.kernels.align import align_tokens
from moecap_kernels.kernels.configs import KernelConfig
from tests.triton_compile import DENSE_CONSTEXPRS, LAYOUT_POINTERS, compile_ptx, has_atomics

TOLERANCE = {torch.float16: 1e-2, torch.float32: 1e-4}


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


# --- an independent float64 reference: one matvec pair at a time -----------------------------
def _act(v: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return v / (1.0 + torch.exp(-v))
    return 0.5 * v * (1.0 + torch.special.erf(v / math.sqrt(2.0)))


def expert_f64(row: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, gated: bool, activation: str):
    """One expert on one row, float64: (h, y) with h = act(gate)·up (or act(in)), y = W_out h."""
    pre = w_in.double() @ row.double()
    if gated:
        width = w_out.shape[1]
        h = _act(pre[:width], activation) * pre[width:]
    else:
        h = _act(pre, activation)
    return h, w_out.double() @ h


def reference_moe(x, w_in, w_out, ids, weights, gated, activation, shared_w_in=None, shared_w_out=None):
    """y[t] = Σ_j w[t, j]·expert_{ids[t, j]}(x[t]) + Σ_s shared_s(x[t]), float64, pair by pair."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    num_shared = 0 if shared_w_in is None else shared_w_in.shape[0]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            y[t] += float(weights[t, j]) * expert_f64(x[t], w_in[e], w_out[e], gated, activation)[1]
        for s in range(num_shared):
            y[t] += expert_f64(x[t], shared_w_in[s], shared_w_out[s], gated, activation)[1]
    return y


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def make_layer(
    rng: random.Random, tokens, experts, top_k, hidden, inter, gated, dtype, num_shared=0, inter_s=0
):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))

    def randn(*shape, fan_in):
        return (torch.randn(*shape, generator=gen) / math.sqrt(fan_in)).to(dtype)

    f_in = 2 if gated else 1
    layer = {
        "x": randn(tokens, hidden, fan_in=1),
        "w_in": randn(experts, f_in * inter, hidden, fan_in=hidden),
        "w_out": randn(experts, hidden, inter, fan_in=inter),
        "ids": torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]),
        "weights": torch.rand(tokens, top_k, generator=gen) + 0.1,
    }
    if num_shared:
        layer["shared_w_in"] = randn(num_shared, f_in * inter_s, hidden, fan_in=hidden)
        layer["shared_w_out"] = randn(num_shared, hidden, inter_s, fan_in=inter_s)
    return layer


def run_layer(layer, config, gated, activation, atomic, counters=None):
    """The kernels end to end, shared experts as extra experts with weight 1; y in fp32."""
    x = layer["x"]
    out = ops.fused_experts(
        x,
        layer["w_in"],
        layer["w_out"],
        layer["ids"],
        layer["weights"],
        config,
        gated=gated,
        activation=activation,
        atomic=atomic,
        counters=counters,
    )
    num_shared = layer["shared_w_in"].shape[0] if "shared_w_in" in layer else 0
    shared = out.new_empty((0, out.shape[1]))
    if num_shared:
        ids = torch.arange(num_shared).expand(x.shape[0], num_shared)
        ones = torch.ones(x.shape[0], num_shared)
        shared = ops.fused_experts(
            x,
            layer["shared_w_in"],
            layer["shared_w_out"],
            ids,
            ones,
            config,
            gated=gated,
            activation=activation,
            atomic=atomic,
            counters=counters,
        )
    if atomic:
        return out + shared if num_shared else out
    return ops.moe_combine(out, shared, layer["ids"].shape[1], num_shared, torch.float32)


# --- kernels one by one, outputs poisoned with NaN ------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("gated", "activation"), [(True, "silu"), (True, "gelu"), (False, "silu")])
def test_each_kernel_writes_exactly_its_rows(dtype, gated, activation):
    rng = random.Random(7)
    tokens, experts, top_k, hidden, inter = 13, 5, 2, 72, 40  # neither divides the blocks
    layer = make_layer(rng, tokens, experts, top_k, hidden, inter, gated, dtype)
    cfg = KernelConfig(16, 32, 32).as_list()
    routing = align_tokens(layer["ids"], experts, 16)
    counters = torch.zeros(3, dtype=torch.int64)

    h = torch.full((routing.max_padded, inter), float("nan"), dtype=dtype)
    ops.launch_gate_up(
        layer["x"],
        layer["w_in"],
        h,
        routing.sorted_pair_ids,
        routing.block_expert_ids,
        routing.num_padded,
        counters,
        top_k,
        gated,
        activation,
        cfg,
        False,
    )
    pairs = routing.sorted_pair_ids.tolist()
    for row, pair in enumerate(pairs):
        if pair == tokens * top_k:  # padding: never written
            assert h[row].isnan().all()
            continue
        t, j = divmod(pair, top_k)
        e = int(layer["ids"][t, j])
        want = expert_f64(layer["x"][t], layer["w_in"][e], layer["w_out"][e], gated, activation)[0]
        assert rel_error(h[row], want) < TOLERANCE[dtype]

    rows = torch.full((tokens * top_k, hidden), float("nan"))
    ops.launch_down(
        h,
        layer["w_out"],
        rows,
        routing.sorted_pair_ids,
        routing.block_expert_ids,
        routing.num_padded,
        layer["weights"],
        counters,
        cfg,
        False,
        False,
    )
    assert rows.isfinite().all()
    y = torch.full((tokens, hidden), float("nan"), dtype=dtype)
    ops.launch_combine(rows, rows[:0], y, top_k, 0)
    want = reference_moe(
        layer["x"], layer["w_in"], layer["w_out"], layer["ids"], layer["weights"], gated, activation
    )
    assert rel_error(y, want) < TOLERANCE[dtype]
    assert counters.tolist() == [0, 0, 0]  # COUNT off: nothing counted


# --- random small layers end to end ----------------------------------------------------------
def random_case(seed: int):
    rng = random.Random(seed)
    experts = rng.randint(1, 16)
    case = {
        "tokens": rng.choice([1, 2, rng.randint(3, 64)]),
        "experts": experts,
        "top_k": rng.randint(1, min(4, experts)),
        "hidden": rng.choice([32, 64, rng.randint(32, 256)]),
        "inter": rng.choice([32, 128, rng.randint(32, 256)]),
        "gated": rng.random() < 0.7,
        "activation": rng.choice(["silu", "gelu"]),
        "dtype": rng.choice([torch.float16, torch.float32]),
        "num_shared": rng.choice([0, 0, 1, 2]),
        "inter_s": rng.randint(32, 96),
        "atomic": rng.random() < 0.5,
    }
    config = KernelConfig(
        rng.choice([16, 32]), rng.choice([32, 64]), rng.choice([16, 32, 64]), group_m=rng.choice([1, 4])
    )
    return rng, case, config


@pytest.mark.parametrize("seed", range(30))
def test_random_layers_match_float64(seed):
    rng, c, config = random_case(seed)
    layer = make_layer(
        rng,
        c["tokens"],
        c["experts"],
        c["top_k"],
        c["hidden"],
        c["inter"],
        c["gated"],
        c["dtype"],
        c["num_shared"],
        c["inter_s"],
    )
    y = run_layer(layer, config, c["gated"], c["activation"], c["atomic"])
    want = reference_moe(
        layer["x"],
        layer["w_in"],
        layer["w_out"],
        layer["ids"],
        layer["weights"],
        c["gated"],
        c["activation"],
        layer.get("shared_w_in"),
        layer.get("shared_w_out"),
    )
    assert y.isfinite().all()
    assert rel_error(y, want) < TOLERANCE[c["dtype"]], (c, config)


def fixed_order_sum(routed, shared, top_k: int, num_shared: int, reverse: bool = False) -> torch.Tensor:
    """y[t] = ((0 + routed[t·k]) + routed[t·k + 1]) + ... + shared[t·S] + ..., in fp32, in that order."""
    terms = [routed.view(-1, top_k, routed.shape[1])[:, j] for j in range(top_k)]
    terms += [shared.view(-1, num_shared, shared.shape[1])[:, s] for s in range(num_shared)]
    acc = torch.zeros_like(terms[0], dtype=torch.float32)
    for term in reversed(terms) if reverse else terms:
        acc = acc + term.float()
    return acc


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_combine_is_the_fixed_order_sum(out_dtype):
    """Bit for bit the fp32 sum in pair order, then shared order, then one cast (the interpreter is
    sequential, so comparing two runs would prove nothing; the order is what makes it reproducible)."""
    gen = torch.Generator().manual_seed(3)
    tokens, top_k, num_shared, hidden = 40, 3, 2, 300  # two H blocks, the second one masked

    def rows(n):  # magnitudes 1e-3..1e3 so that the summation order shows in the low bits
        return torch.randn(n, hidden, generator=gen) * 10.0 ** torch.randint(-3, 4, (n, 1), generator=gen)

    routed, shared = rows(tokens * top_k), rows(tokens * num_shared)
    want = fixed_order_sum(routed, shared, top_k, num_shared)
    assert not torch.equal(want, fixed_order_sum(routed, shared, top_k, num_shared, reverse=True))
    y = ops.moe_combine(routed, shared, top_k, num_shared, out_dtype)
    assert torch.equal(y, want.to(out_dtype))


# --- counters and FLOP formulas ---------------------------------------------------------------
def expected_counters(ids: torch.Tensor, experts: int, block_m: int, params: int, w_bytes: int):
    counts = torch.bincount(ids.flatten(), minlength=experts).tolist()
    blocks = sum(-(-n // block_m) for n in counts)
    return [blocks * block_m - ids.numel(), blocks * block_m * 2 * params, blocks * params * w_bytes]


@pytest.mark.parametrize(
    ("hidden", "inter", "gated", "dtype"),
    [(64, 128, True, torch.float16), (128, 64, False, torch.float32), (72, 40, True, torch.float16)],
)
def test_counters_are_exact(hidden, inter, gated, dtype):
    """Sizes that divide the blocks, and (72, 40) that do not: only in-bounds tiles are counted."""
    rng = random.Random(hidden + inter)
    tokens, experts, top_k, num_shared, inter_s = 37, 6, 2, 1, 64
    layer = make_layer(rng, tokens, experts, top_k, hidden, inter, gated, dtype, num_shared, inter_s)
    config = KernelConfig(16, 32, 32)
    counters = torch.zeros(3, dtype=torch.int64)
    run_layer(layer, config, gated, "silu", atomic=True, counters=counters)
    mats = 3 if gated else 2
    w_bytes = torch.empty((), dtype=dtype).element_size()
    routed = expected_counters(layer["ids"], experts, 16, mats * hidden * inter, w_bytes)
    shared_ids = torch.arange(num_shared).expand(tokens, num_shared)
    shared = expected_counters(shared_ids, num_shared, 16, mats * hidden * inter_s, w_bytes)
    assert counters.tolist() == [a + b for a, b in zip(routed, shared, strict=True)]


def test_flop_counter_counts_useful_flops_only():
    rng = random.Random(5)
    tokens, experts, top_k, hidden, inter = 21, 7, 3, 64, 48
    layer = make_layer(rng, tokens, experts, top_k, hidden, inter, True, torch.float16, 2, 32)
    with FlopCounterMode(display=False) as counter:
        run_layer(layer, KernelConfig(16, 32, 32), True, "silu", atomic=False)
    useful = 2 * tokens * top_k * 3 * hidden * inter + 2 * tokens * 2 * 3 * hidden * 32
    assert counter.get_total_flops() == useful
    gate_up = counter.get_flop_counts()["Global"][torch.ops.moecap.moe_gate_up]
    assert gate_up == 2 * tokens * top_k * 2 * hidden * inter + 2 * tokens * 2 * 2 * hidden * 32


def test_custom_ops_pass_opcheck():
    rng = random.Random(9)
    tokens, experts, top_k, hidden, inter = 9, 4, 2, 48, 40
    layer = make_layer(rng, tokens, experts, top_k, hidden, inter, True, torch.float16)
    routing = align_tokens(layer["ids"], experts, 16)
    layout = (routing.sorted_pair_ids, routing.block_expert_ids, routing.num_padded)
    counters = torch.zeros(3, dtype=torch.int64)
    cfg = KernelConfig(16, 32, 32).as_list()
    gate_up_args = (layer["x"], layer["w_in"], *layout, counters, top_k, True, "silu", cfg, True)
    # The padding rows of h are left unwritten (never read), so eager and traced h differ there:
    # the comparison of whole outputs under AOT tracing does not apply to this op.
    torch.library.opcheck(
        ops.moe_gate_up,
        gate_up_args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    h = ops.moe_gate_up(*gate_up_args)
    for atomic in (True, False):
        torch.library.opcheck(
            ops.moe_down, (h, layer["w_out"], *layout, layer["weights"], counters, cfg, atomic, True)
        )
    rows = ops.moe_down(h, layer["w_out"], *layout, layer["weights"], counters, cfg, False, False)
    torch.library.opcheck(ops.moe_combine, (rows, rows[:0], top_k, 0, torch.float16))


# --- compiled mode: the kernels build for Hopper (sm_90) even without a GPU -----------------------
def quant_pointers(dtype: str) -> dict[str, str]:
    """Dense experts: the scale, zero-point and activation-scale pointers are never read (x's type)."""
    return dict.fromkeys(("scale_ptr", "zero_ptr", "a_scale_ptr"), f"*{dtype}")


@pytest.mark.parametrize(
    ("dtype", "block", "gated", "activation", "count", "extras"),
    [
        ("bf16", (16, 64, 128), True, 0, True, False),
        ("bf16", (128, 128, 64), False, 1, False, False),
        ("fp32", (64, 64, 32), True, 1, True, False),
        ("bf16", (64, 128, 64), True, 3, False, True),  # gpt-oss: biases, clamped SwiGLU; weights on input
        ("fp16", (64, 64, 64), True, 2, False, False),
    ],
)
def test_gate_up_compiles_for_hopper(monkeypatch, dtype, block, gated, activation, count, extras):
    from moecap_kernels.kernels.grouped_gemm import gate_up_kernel

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set to silence triton 3.9
    pointers = {
        "x_ptr": f"*{dtype}",
        "w_ptr": f"*{dtype}",
        "h_ptr": f"*{dtype}",
        "bias_ptr": f"*{dtype}",
        "pair_weights_ptr": "*fp32",
        "alpha": "fp32",
        "limit": "fp32",
        **quant_pointers(dtype),
        **LAYOUT_POINTERS,
    }
    block_m, block_n, block_k = block
    constexprs = dict(
        TOP_K=8,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=8,
        GATED=gated,
        ACTIVATION=activation,
        HAS_BIAS=extras,
        WEIGHTS_ON_INPUT=extras,
        INPUT_PRECISION="ieee" if dtype == "fp32" else None,
        COUNT=count,
        **DENSE_CONSTEXPRS,
    )
    ptx = compile_ptx(
        gate_up_kernel,
        pointers,
        constexprs,
        ("stride_xh", "stride_wh", "stride_hf"),
        num_warps=8 if block_m == 128 else 4,
        num_stages=3,
    )
    assert has_atomics(ptx) == count  # the counters are compiled in only when COUNT is on
    if dtype == "bf16" and block_m >= 64:
        assert "wgmma" in ptx


@pytest.mark.parametrize(("dtype", "atomic", "count"), [("bf16", True, True), ("fp16", False, False)])
def test_down_and_combine_compile_for_hopper(monkeypatch, dtype, atomic, count):
    from moecap_kernels.kernels.combine import combine_kernel
    from moecap_kernels.kernels.grouped_gemm import down_kernel

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set to silence triton 3.9
    pointers = {
        "h_ptr": f"*{dtype}",
        "w_ptr": f"*{dtype}",
        "out_ptr": "*fp32",
        "pair_weights_ptr": "*fp32",
        "bias_ptr": f"*{dtype}",
        **quant_pointers(dtype),
        **LAYOUT_POINTERS,
    }
    constexprs = dict(
        TOP_K=8,
        BLOCK_M=64,
        BLOCK_N=128,
        BLOCK_K=64,
        GROUP_M=8,
        ATOMIC=atomic,
        HAS_BIAS=atomic,
        INPUT_PRECISION=None,
        COUNT=count,
        **DENSE_CONSTEXPRS,
    )
    ptx = compile_ptx(
        down_kernel, pointers, constexprs, ("stride_hf", "stride_wf", "stride_oh"), num_warps=4, num_stages=3
    )
    assert has_atomics(ptx) == (atomic or count)
    rows = {"routed_ptr": "*fp32", "shared_ptr": "*fp32", "y_ptr": f"*{dtype}"}
    ptx = compile_ptx(
        combine_kernel, rows, dict(TOP_K=8, NUM_SHARED=1, BLOCK_H=256), (), num_warps=4, num_stages=1
    )
    assert not has_atomics(ptx)
