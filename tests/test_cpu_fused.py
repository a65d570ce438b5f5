"""The fused CPU expert kernel (moecap::moe_experts_cpu) and the cpu_fused backend vs a float64 loop.

Inputs are fresh random tensors (never zeros), so an output element the kernel forgets to write
(left zero, or NaN from the poisoned allocator below) shows up as a large error.
"""

from __future__ import annotations

import math

import pytest
import torch

from moecap_kernels import _ext
from moecap_kernels.backends import cpu_fused
from moecap_kernels.backends.cpu_fused import (
    CpuFusedBackend,
    packing_unavailable_reason,
    use_fused,
    use_fused_shared,
)
from moecap_kernels.reference import relative_error
from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import MoEWeights

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}
SILU, GELU_ERF, GELU_TANH = 0, 1, 2
ISA_NAMES = ("scalar", "avx2", "avx512", "avx512-bf16")

pytestmark = pytest.mark.skipif(
    not _ext.has_op("moe_experts_cpu", "cpu"),
    reason=f"moecap::moe_experts_cpu could not be built or loaded: {_ext.extension_status()}",
)


def op(*args: object) -> torch.Tensor:
    return torch.ops.moecap.moe_experts_cpu(*args)


def best_isa() -> int:
    return int(torch.ops.moecap.moe_experts_cpu_info()[0])


# --- independent float64 reference -------------------------------------------------------------
def act64(v: torch.Tensor, activation: int) -> torch.Tensor:
    if activation == SILU:
        return v / (1.0 + torch.exp(-v))
    if activation == GELU_ERF:
        return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))
    return 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))


def reference(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gated: bool,
    activation: int,
) -> torch.Tensor:
    """Plain loop over the routed (token, slot) pairs, everything in float64."""
    f = w_out.shape[2]
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w_in[e].double() @ x[t].double()
            inner = act64(h[:f], activation) * h[f:] if gated else act64(h, activation)
            y[t] += float(weights[t, j]) * (w_out[e].double() @ inner)
    return y


# --- inputs ---------------------------------------------------------------------------------------
def make_problem(
    t: int, h: int, f: int, e: int, k: int, gated: bool, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """x, w_in, w_out (1/sqrt(fan_in) scale), distinct top-k ids per token, positive weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen).to(dtype)
    w_in = (torch.randn(e, (2 if gated else 1) * f, h, generator=gen) * h**-0.5).to(dtype)
    w_out = (torch.randn(e, h, f, generator=gen) * f**-0.5).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=gen) + 0.1
    return x, w_in, w_out, ids, weights


def poison_allocator(numel: int, dtype: torch.dtype) -> None:
    """Frees a NaN-filled block the size of the op's output, which the op's allocation may reuse."""
    poisoned = torch.full((numel,), float("nan"), dtype=dtype)
    del poisoned


def check(
    t: int,
    h: int,
    f: int,
    e: int,
    k: int,
    gated: bool,
    activation: int,
    dtype: torch.dtype,
    max_isa: int = -1,
    ids: torch.Tensor | None = None,
) -> None:
    x, w_in, w_out, drawn, weights = make_problem(t, h, f, e, k, gated, dtype)
    ids = drawn if ids is None else ids
    poison_allocator(t * h, dtype)
    y = op(x, w_in, w_out, ids, weights, gated, activation, max_isa)
    assert y.shape == (t, h) and y.dtype == dtype
    err = relative_error(y, reference(x, w_in, w_out, ids, weights, gated, activation))
    assert err < TOLERANCE[dtype], f"relative error {err:.2e} (dtype {dtype}, isa cap {max_isa})"


# --- the op ---------------------------------------------------------------------------------------
SHAPES = [  # (T, H, F, E, k): H and F off the 16/32-lane vector widths; k = E; T up to 64
    (1, 67, 37, 5, 2),
    (4, 130, 45, 4, 4),
    (13, 96, 70, 8, 2),
    (64, 48, 33, 6, 3),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-H{}-F{}-E{}-k{}".format(*s))
def test_matches_float64_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    check(*shape, gated=True, activation=SILU, dtype=dtype)


@pytest.mark.parametrize("activation", [SILU, GELU_ERF, GELU_TANH], ids=["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_activations_and_non_gated(gated: bool, activation: int, dtype: torch.dtype) -> None:
    check(9, 80, 52, 5, 2, gated, activation, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_every_token_to_one_expert(dtype: torch.dtype) -> None:
    ids = torch.full((37, 1), 2, dtype=torch.int64)
    check(37, 72, 40, 4, 1, True, SILU, dtype, ids=ids)


@pytest.mark.parametrize("tokens", [5, 9, 10, 13, 16, 21])
def test_many_tokens_per_expert_long_rows(tokens: int) -> None:
    """An expert with more routed rows than one call of the row kernels takes (4), over rows longer
    than 1024: further chunks reuse the weight pass from cache (tails: 1100 % 32, 600 % 32, 21 % 4)."""
    ids = torch.stack([torch.tensor([1, 0])] * tokens)
    check(tokens, 1100, 600, 3, 2, True, SILU, torch.bfloat16, ids=ids)


def test_one_token_many_experts() -> None:
    check(1, 2048 + 5, 96 + 3, 16, 16, True, SILU, torch.bfloat16)


def test_repeated_expert_within_a_token() -> None:
    ids = torch.tensor([[1, 1], [0, 3], [3, 3]])
    check(3, 64, 32, 4, 2, True, SILU, torch.bfloat16, ids=ids)


def test_int32_ids_and_bf16_weights() -> None:
    x, w_in, w_out, ids, weights = make_problem(6, 50, 20, 4, 2, True, torch.float32)
    y = op(x, w_in, w_out, ids.int(), weights.bfloat16(), True, SILU)
    ref = reference(x, w_in, w_out, ids, weights.bfloat16().float(), True, SILU)
    assert relative_error(y, ref) < 1e-5


@pytest.mark.parametrize("isa", range(4), ids=ISA_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_every_instruction_set_path(isa: int, dtype: torch.dtype) -> None:
    if isa > best_isa():
        pytest.skip(f"this CPU lacks {ISA_NAMES[isa]}")
    check(11, 100, 41, 6, 3, True, SILU, dtype, max_isa=isa)


# --- the epilogue: biases, gpt-oss' clamped SwiGLU, routing weights on the input (Llama 4) ---------
SWIGLU_OAI = 3


def epilogue_reference(x, w_in, w_out, ids, weights, b_in, b_out, activation, alpha, limit, on_input):
    """The plain loop again, with each feature spelled out in float64."""
    f = w_out.shape[2]
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e, w = int(ids[t, j]), float(weights[t, j])
            row = x[t].double() * (w if on_input else 1.0)
            h = w_in[e].double() @ row + (b_in[e].double() if b_in is not None else 0.0)
            gate, up = h[:f], h[f:]
            if activation == SWIGLU_OAI:
                g = gate.clamp(max=limit)
                inner = (up.clamp(-limit, limit) + 1) * g / (1 + torch.exp(-alpha * g))
            else:
                inner = act64(gate, activation) * up
            out = w_out[e].double() @ inner + (b_out[e].double() if b_out is not None else 0.0)
            y[t] += out if on_input else w * out
    return y


@pytest.mark.parametrize("isa", range(4), ids=ISA_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    ("activation", "biases", "on_input"),
    [(SWIGLU_OAI, True, False), (SILU, True, False), (SILU, False, True), (SWIGLU_OAI, True, True)],
    ids=["gpt-oss", "biases", "llama4", "all"],
)
def test_epilogue_features_on_every_path(isa, dtype, activation, biases, on_input) -> None:
    if isa > best_isa():
        pytest.skip(f"this CPU lacks {ISA_NAMES[isa]}")
    t, h, f, e, k = 11, 100, 41, 6, 3
    x, w_in, w_out, ids, weights = make_problem(t, h, f, e, k, True, dtype, seed=isa)
    gen = torch.Generator().manual_seed(7)
    b_in = (torch.randn(e, 2 * f, generator=gen) * 0.3).to(dtype) if biases else None
    b_out = (torch.randn(e, h, generator=gen) * 0.3).to(dtype) if biases else None
    alpha, limit = 1.702, 0.6  # a limit the activations cross, so the clamps act
    poison_allocator(t * h, dtype)
    y = op(x, w_in, w_out, ids, weights, True, activation, isa, b_in, b_out, alpha, limit, on_input)
    ref = epilogue_reference(x, w_in, w_out, ids, weights, b_in, b_out, activation, alpha, limit, on_input)
    assert relative_error(y, ref) < TOLERANCE[dtype]


def test_bad_biases_and_clamped_swiglu_without_gate_are_refused() -> None:
    x, w_in, w_out, ids, weights = make_problem(3, 16, 8, 4, 2, True, torch.float32)
    with pytest.raises(RuntimeError, match="b_in must be"):
        op(x, w_in, w_out, ids, weights, True, SILU, -1, torch.zeros(4, 8), None)
    with pytest.raises(RuntimeError, match="b_out must have x's dtype"):
        op(x, w_in, w_out, ids, weights, True, SILU, -1, None, torch.zeros(4, 16, dtype=torch.bfloat16))
    x, w_in, w_out, ids, weights = make_problem(3, 16, 8, 4, 2, False, torch.float32)
    with pytest.raises(RuntimeError, match="needs gated experts"):
        op(x, w_in, w_out, ids, weights, False, SWIGLU_OAI)


def test_info_reports_isa_and_threading() -> None:
    isa, threaded = torch.ops.moecap.moe_experts_cpu_info()
    assert 0 <= isa <= 3 and threaded in (0, 1)


def test_empty_batch() -> None:
    x, w_in, w_out, ids, weights = make_problem(1, 16, 8, 2, 1, True, torch.float32)
    y = op(x[:0], w_in, w_out, ids[:0], weights[:0], True, SILU)
    assert y.shape == (0, 16)


# --- input validation -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_id", [4, -1, 1000])
def test_out_of_range_id_raises(bad_id: int) -> None:
    x, w_in, w_out, ids, weights = make_problem(3, 16, 8, 4, 2, True, torch.float32)
    ids[1, 0] = bad_id
    with pytest.raises(RuntimeError, match="outside"):
        op(x, w_in, w_out, ids, weights, True, SILU)


def bad_arguments(case: str) -> tuple[object, ...]:
    """Arguments that are wrong in exactly one way, named by ``case``."""
    x, w_in, w_out, ids, weights = make_problem(3, 16, 8, 4, 2, True, torch.float32)
    args = {"x": x, "w_in": w_in, "w_out": w_out, "ids": ids, "weights": weights, "gated": True, "act": SILU}
    changes = {
        "dtype mismatch": {"x": x.bfloat16()},
        "gated needs 2F rows": {"gated": False},
        "H mismatch": {"x": x[:, :8].contiguous()},
        "non-contiguous w_out": {"w_out": w_out.transpose(1, 2).contiguous().transpose(1, 2)},
        "float ids": {"ids": ids.float()},
        "weights shape": {"weights": weights[:, :1].contiguous()},
        "activation code": {"act": 7},
        "int64 x": {"x": x.long()},
    }
    args.update(changes[case])
    return tuple(args.values())


BAD_CASES = (
    "dtype mismatch",
    "gated needs 2F rows",
    "H mismatch",
    "non-contiguous w_out",
    "float ids",
    "weights shape",
    "activation code",
    "int64 x",
)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_arguments_raise(case: str) -> None:
    with pytest.raises(RuntimeError):
        op(*bad_arguments(case))


def test_thread_count_does_not_change_the_result() -> None:
    x, w_in, w_out, ids, weights = make_problem(24, 300, 200, 8, 2, True, torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = op(x, w_in, w_out, ids, weights, True, SILU)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, op(x, w_in, w_out, ids, weights, True, SILU))


# --- the backend ------------------------------------------------------------------------------------
def make_layer(shared: int, dtype: torch.dtype, seed: int = 1) -> tuple[MoESpec, MoEWeights]:
    spec = MoESpec(
        name="test",
        hidden_size=72,
        intermediate_size=40,
        num_experts=6,
        top_k=2,
        num_shared_experts=shared,
        shared_intermediate_size=56 if shared else 0,
    )
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * shape[-1] ** -0.5).to(dtype)

    h, f, e, fs = 72, 40, 6, 56
    weights = MoEWeights(
        router=rand(e, h),
        w_in=rand(e, 2 * f, h),
        w_out=rand(e, h, f),
        shared_w_in=rand(shared, 2 * fs, h),
        shared_w_out=rand(shared, h, fs),
    )
    return spec, weights


def layer_reference(
    x: torch.Tensor, spec: MoESpec, w: MoEWeights, ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    y = reference(x, w.w_in, w.w_out, ids, weights, True, SILU)
    for s in range(spec.num_shared_experts):
        every = torch.zeros(x.shape[0], 1, dtype=torch.int64)
        y += reference(
            x,
            w.shared_w_in[s : s + 1],
            w.shared_w_out[s : s + 1],
            every,
            torch.ones(x.shape[0], 1),
            True,
            SILU,
        )
    return y


def test_backend_available_on_cpu_only() -> None:
    backend = CpuFusedBackend()
    assert backend.availability(torch.device("cpu"), torch.bfloat16) is None
    assert backend.availability(torch.device("meta"), torch.bfloat16) is not None
    assert backend.availability(torch.device("cpu"), torch.float64) is not None


@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("tokens", [1, 5, 40], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("path", ["op", "gemms"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_backend_matches_reference(
    tokens: int, shared: int, path: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both paths, forced by the threshold: the op, and GEMMs (on oneDNN-packed weights where oneDNN
    can pack the dtype, else plain torch)."""
    monkeypatch.setattr(cpu_fused, "FUSED_MAX_EXPERT_ROW_BYTES", 2**40 if path == "op" else 0)
    spec, w = make_layer(shared, dtype)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, spec.hidden_size, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(spec.num_experts, generator=gen)[: spec.top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, spec.top_k, generator=gen) + 0.1
    poison_allocator(tokens * spec.hidden_size, dtype)
    y = CpuFusedBackend().forward(x, w, spec, ids, weights)
    assert y.shape == x.shape and y.dtype == dtype
    err = relative_error(y, layer_reference(x, spec, w, ids, weights))
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"
    packed = id(w.w_in) in cpu_fused._PACKED
    assert packed == (path == "gemms" and packing_unavailable_reason(dtype) is None)


def test_packed_copy_is_made_once_and_dropped_with_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    if packing_unavailable_reason(torch.bfloat16) is not None:
        pytest.skip(packing_unavailable_reason(torch.bfloat16))
    monkeypatch.setattr(cpu_fused, "FUSED_MAX_EXPERT_ROW_BYTES", 0)
    spec, w = make_layer(1, torch.bfloat16)
    x, ids = torch.randn(4, spec.hidden_size).bfloat16(), torch.tensor([[0, 1], [2, 3], [4, 5], [0, 5]])
    backend = CpuFusedBackend()
    backend.forward(x, w, spec, ids, torch.ones(4, 2))
    first = cpu_fused._PACKED[id(w.w_in)]
    backend.forward(x, w, spec, ids, torch.ones(4, 2))
    assert cpu_fused._PACKED[id(w.w_in)] is first
    key = id(w.w_in)
    del w, first
    assert key not in cpu_fused._PACKED


@pytest.mark.parametrize("gemms", [True, False])
def test_prepare_packs_only_when_gemms_will_run(gemms: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if packing_unavailable_reason(torch.bfloat16) is not None:
        pytest.skip(packing_unavailable_reason(torch.bfloat16))
    monkeypatch.setattr(cpu_fused, "FUSED_MAX_EXPERT_ROW_BYTES", 0 if gemms else 2**40)
    spec, w = make_layer(0, torch.bfloat16)
    CpuFusedBackend().prepare(w, spec, tokens=8)
    assert (id(w.w_in) in cpu_fused._PACKED) == gemms


@pytest.mark.parametrize(
    ("preset", "op_up_to", "gemms_from"),
    [
        ("mixtral-8x7b", 2, 4),
        ("qwen3-30b-a3b", 64, 128),
        ("olmoe-1b-7b", 32, 64),
        ("deepseek-v2-lite", 32, 64),
    ],
)
def test_threshold_sits_between_the_measured_crossovers(preset: str, op_up_to: int, gemms_from: int) -> None:
    """The T at which each path won: benchmarks/results/cpu_kernel_bench-2026-11-29-crossovers.md."""
    from moecap_kernels.spec import load_preset

    spec = load_preset(preset).with_dtype("bfloat16")
    assert use_fused(op_up_to, spec) and not use_fused(gemms_from, spec)


def test_shared_experts_take_gemms_once_tokens_outgrow_the_op() -> None:
    from moecap_kernels.spec import load_preset

    spec = load_preset("deepseek-v2-lite").with_dtype("bfloat16")
    assert use_fused_shared(1, spec) and not use_fused_shared(64, spec)


def test_memory_check_counts_the_packed_copy() -> None:
    """A layer whose weights fit but whose weights plus the packed copy do not is refused up front."""
    from moecap_kernels.errors import UserError
    from moecap_kernels.hardware import DeviceInfo
    from moecap_kernels.runner import check_fits, estimate_memory_bytes
    from moecap_kernels.spec import load_preset

    spec = load_preset("mixtral-8x7b").with_dtype("bfloat16")
    tokens = 64  # GEMMs, so the backend packs a copy of the experts
    assert not use_fused(tokens, spec)
    need = estimate_memory_bytes(spec, tokens, check_accuracy=False)
    info = DeviceInfo("cpu", "test", 2 * need, int(need / 0.8), 1 << 25, 2, "0")
    check_fits(spec, tokens, info, False, ("loop",))
    with pytest.raises(UserError, match="backends' own copies"):
        check_fits(spec, tokens, info, False, ("loop", "cpu_fused"))
    check_fits(spec, 1, info, False, ("cpu_fused",))  # decode: the op, no copy


@pytest.mark.parametrize("layer", ["gpt-oss", "llama4", "qwen2-moe", "deepseek-v3", "phimoe"])
@pytest.mark.parametrize("path", ["op", "gemms"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_backend_computes_every_family_feature(layer: str, path: str, dtype, monkeypatch) -> None:
    """The layer variants of test_backends through both paths, against the float64 reference."""
    from moecap_kernels.reference import reference_forward
    from tests.helpers import tiny_spec
    from tests.test_backends import LAYERS, routed

    monkeypatch.setattr(cpu_fused, "FUSED_MAX_EXPERT_ROW_BYTES", 2**40 if path == "op" else 0)
    spec = tiny_spec(**LAYERS[layer]).with_dtype(str(dtype).removeprefix("torch."))
    assert CpuFusedBackend().supports(spec) is None
    x, weights, ids, w = routed(spec, 9, seed=4)
    poison_allocator(x.numel(), dtype)
    y = CpuFusedBackend().forward(x, weights, spec, ids, w)
    assert relative_error(y, reference_forward(x, weights, spec, ids, w)) < TOLERANCE[dtype]
