"""The ``cpu_fused`` backend on quantized experts (``moecap::moe_experts_cpu_q``): every format it
computes, in bfloat16, float16 and float32, on three layers and on every instruction-set path this
CPU runs, against the float64 layer with the dequantized weights (``reference_forward(...,
dequantized=True)``); edge routings, K tails, group sizes that are not powers of two, and the op's
refusals of bad input.

Shapes per format: its groups divide K; H = 72 leaves K tails of 8 (16-lane) and 8 (64-byte) for
the byte formats; fp8-block's F = 136 gives each projection a full and a partial 128-row block and
the down projection a full and a partial 128-column group; int4-g128 / -zp and mxfp4 at multiples of
128 take the AVX-512 BF16 kernels, int4-g32 and the (64, 96) mxfp4 the 32-column fp32 ones, int4-g48
the portable path on every level.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moecap_kernels import _ext
from moecap_kernels.backends.cpu_fused import QUANT_OP_NAME, CpuFusedBackend, quantized_experts
from moecap_kernels.quant.layer import in_format
from moecap_kernels.reference import reference_forward, relative_error
from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import random_weights
from tests.helpers import tiny_spec

pytestmark = pytest.mark.skipif(
    not _ext.has_op(QUANT_OP_NAME, "cpu"),
    reason=f"moecap::{QUANT_OP_NAME} could not be built or loaded: {_ext.extension_status()}",
)

# Largest relative errors measured on this suite (2-core AMD EPYC Zen 4, all four ISA levels):
# 3.2e-3 (bfloat16: the output's and act(gate)·up's rounding to bf16), 3.5e-4 (float16: the output's
# rounding), 4.5e-7 (float32, int4-g128-zp with K = 2176). Bounds a few times above.
TOLERANCE = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 2e-6}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ISA_NAMES = ("scalar", "avx2", "avx512", "avx512-bf16")

# (H, F, F_s) per format
SHAPES = {
    "int8": (72, 40, 24),
    "w8a8": (72, 40, 24),
    "int4-g32": (64, 96, 32),
    "int4-g32-zp": (64, 96, 32),
    "int4-g48": (96, 48, 48),
    "int4-g128": (256, 128, 128),
    "int4-g128-zp": (128, 256, 128),
    "int4-g256-zp": (256, 256, 256),  # two 128-column blocks per group
    "fp8-tensor": (72, 40, 24),
    "fp8-channel": (72, 40, 24),
    "fp8-block": (72, 136, 24),
    "mxfp4": (128, 256, 128),
}
FORMATS = list(SHAPES)

LAYERS = {
    "mixtral": {},
    # gpt-oss: expert biases and the clamped SwiGLU (a limit the activations cross)
    "gpt-oss": {"expert_bias": True, "activation": "swiglu_oai", "swiglu_limit": 0.5},
    # Llama 4's weights on the input, Qwen2-MoE's gated shared expert
    "llama4-shared": {"weights_on_input": True, "num_shared_experts": 1, "shared_expert_gate": True},
}


def best_isa() -> int:
    return int(torch.ops.moecap.moe_experts_cpu_info()[0])


def isa_levels() -> list[int]:
    return list(range(best_isa() + 1))


def make_spec(fmt: str, dtype: str, shape: tuple[int, int, int] | None = None, **overrides) -> MoESpec:
    hidden, inter, inter_s = shape or SHAPES[fmt]
    base = dict(hidden_size=hidden, intermediate_size=inter, num_experts=6, shared_intermediate_size=inter_s)
    return tiny_spec(**{**base, **overrides}).with_dtype(dtype).with_format(fmt)


def layer(spec: MoESpec, tokens: int, seed: int, ids: torch.Tensor | None = None):
    """Quantized weights, x, routing ids (random unless given) and routing weights."""
    weights = in_format(random_weights(spec, seed=seed), spec)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, spec.hidden_size, generator=gen).to(DTYPES[spec.act_dtype])
    if ids is None:
        perms = [torch.randperm(spec.num_experts, generator=gen)[: spec.top_k] for _ in range(tokens)]
        ids = torch.stack(perms)
    topk_weights = torch.rand(tokens, spec.top_k, generator=gen) + 0.1
    return weights, x, ids, topk_weights


def poison_allocator(numel: int, dtype: torch.dtype) -> None:
    """Frees a NaN-filled block the size of the op's output, which the op's allocation may reuse."""
    poisoned = torch.full((numel,), float("nan"), dtype=dtype)
    del poisoned


def check_every_isa(spec: MoESpec, weights, x, ids, topk_weights) -> list[float]:
    """The backend's forward at every ISA level this CPU runs, against the dequantized reference."""
    want = reference_forward(x, weights, spec, ids, topk_weights, dequantized=True)
    backend = CpuFusedBackend()
    errors = []
    for isa in isa_levels():
        backend.max_isa = isa
        poison_allocator(x.numel(), x.dtype)
        y = backend.forward(x, weights, spec, ids, topk_weights)
        assert y.dtype == x.dtype and y.shape == x.shape, (spec.weight_format, ISA_NAMES[isa])
        assert y.isfinite().all(), (spec.weight_format, ISA_NAMES[isa])
        err = relative_error(y, want)
        assert err < TOLERANCE[x.dtype], f"{spec.weight_format} {x.dtype} {ISA_NAMES[isa]}: {err:.2e}"
        errors.append(err)
    return errors


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_matches_dequantized_reference(fmt, dtype, name):
    spec = make_spec(fmt, dtype, **LAYERS[name])
    check_every_isa(spec, *layer(spec, 7, seed=3))


ROUTINGS = {
    "one-token": ({}, 1, None),
    "one-expert": ({"top_k": 1}, 20, torch.full((20, 1), 4)),  # 20 rows of one expert: 5 passes of 4
    "every-expert": ({"top_k": 2}, 6, torch.tensor([[0, 1], [2, 3], [4, 5], [1, 0], [3, 2], [5, 4]])),
    "k=E": ({"num_experts": 3, "top_k": 3, "num_shared_experts": 2}, 5, None),
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("fmt", ["int8", "w8a8", "int4-g32-zp", "int4-g128", "fp8-block", "mxfp4"])
def test_edge_routings(fmt, routing):
    overrides, tokens, ids = ROUTINGS[routing]
    spec = make_spec(fmt, "bfloat16", **overrides)
    check_every_isa(spec, *layer(spec, tokens, seed=5, ids=ids))


TAILS = {  # (format, (H, F, F_s)): K not a multiple of the vector widths, groups of odd sizes
    "int8-odd": ("int8", (67, 37, 21)),
    "w8a8-odd": ("w8a8", (67, 130, 21)),
    "fp8-channel-odd": ("fp8-channel", (67, 37, 21)),
    "fp8-block-130": ("fp8-block", (130, 136, 20)),  # partial 128-column groups in both projections
    "int4-g6": ("int4-g6", (66, 42, 18)),
    "int4-g96-zp": ("int4-g96-zp", (96, 192, 96)),  # a multiple of 32, not of 128
    "mxfp4-small": ("mxfp4", (64, 96, 32)),  # 32-column fp32 kernel at the bf16 level too
    "int4-g128-zp-17": ("int4-g128-zp", (2176, 128, 128)),  # 17 groups: scales, zeros 16 at a time
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", list(TAILS))
def test_k_tails_and_group_sizes(case, dtype):
    fmt, shape = TAILS[case]
    spec = make_spec(fmt, dtype, shape)
    check_every_isa(spec, *layer(spec, 9, seed=7))


def test_many_tokens_longer_rows():
    """More routed rows per expert than one register tile (4), K of several hundred."""
    spec = make_spec("int4-g128-zp", "bfloat16", (512, 384, 128), top_k=2)
    ids = torch.stack([torch.tensor([1, 0])] * 11)
    check_every_isa(spec, *layer(spec, 11, seed=9, ids=ids))


def test_w8a8_quantizes_activations():
    """w8a8's reference rounds x and act(gate)·up to int8 per row: without that rounding the op's
    result would be off by far more than its tolerance, so the op really does it."""
    spec = make_spec("w8a8", "float32")
    weights, x, ids, topk_weights = layer(spec, 7, seed=11)
    y = CpuFusedBackend().forward(x, weights, spec, ids, topk_weights)
    int8_spec = make_spec("int8", "float32")
    without = reference_forward(x, weights, int8_spec, ids, topk_weights, dequantized=True)
    assert relative_error(y, without) > 100 * TOLERANCE[torch.float32]


# --- the backend ------------------------------------------------------------------------------------
def test_backend_formats_and_refusals():
    backend = CpuFusedBackend()
    for fmt in ("none", "int8", "w8a8", "int4-g48", "int4-g128-zp", "fp8-tensor", "fp8-block", "mxfp4"):
        assert backend.supports(make_spec("int8", "bfloat16", (384, 384, 384)).with_format(fmt)) is None, fmt
    long = tiny_spec(hidden_size=70000, intermediate_size=64).with_format("w8a8")
    why = backend.supports(long)
    assert why is not None and "int32" in why and "\n" not in why
    assert backend.supports(long.with_format("int8")) is None


def test_forward_without_quantized_weights_is_refused():
    spec = make_spec("int8", "bfloat16")
    _, x, ids, topk_weights = layer(spec, 3, seed=1)
    plain = random_weights(spec, seed=1)  # no .quantized
    with pytest.raises(ValueError, match=r"weights\.quantized"):
        CpuFusedBackend().forward(x, plain, spec, ids, topk_weights)


# --- the op's refusals ----------------------------------------------------------------------------------
def op_args(fmt: str = "int4-g32-zp"):
    spec = make_spec(fmt, "bfloat16")
    weights, x, ids, topk_weights = layer(spec, 3, seed=2)
    return spec, weights.quantized, x, ids, topk_weights


def call(spec, q, x, ids, wts, **change):
    w_in, w_out = change.pop("w_in", q.w_in), change.pop("w_out", q.w_out)
    return quantized_experts(x, w_in, w_out, ids, wts, spec, **change)


def test_bad_codes_are_refused():
    spec, q, x, ids, wts = op_args()
    with pytest.raises(RuntimeError, match="w_in codes must be Byte"):
        call(spec, q, x, ids, wts, w_in=dataclasses.replace(q.w_in, codes=q.w_in.codes.float()))
    short_out = dataclasses.replace(q.w_out, codes=q.w_out.codes[:, :-1].contiguous())
    with pytest.raises(RuntimeError, match=r"w_out codes must be \[E="):
        call(spec, q, x, ids, wts, w_out=short_out)
    short_in = dataclasses.replace(q.w_in, codes=q.w_in.codes[:, :, :-1].contiguous())
    with pytest.raises(RuntimeError, match=r"w_in codes must be \[E, 2F="):
        call(spec, q, x, ids, wts, w_in=short_in)
    strided = torch.cat([q.w_in.codes, q.w_in.codes], dim=2)[:, :, ::2]  # the right shape, not contiguous
    with pytest.raises(RuntimeError, match="w_in must be contiguous"):
        a, b = q.w_in, q.w_out
        torch.ops.moecap.moe_experts_cpu_q(
            x, strided, a.scales, a.zeros, b.codes, b.scales, b.zeros, ids, wts, 3, 32, 1, True, 0
        )


def test_bad_scales_and_zeros_are_refused():
    spec, q, x, ids, wts = op_args()
    replace = dataclasses.replace
    with pytest.raises(RuntimeError, match="w_in_scales must be Half"):
        call(spec, q, x, ids, wts, w_in=replace(q.w_in, scales=q.w_in.scales.float()))
    with pytest.raises(RuntimeError, match=r"w_out_scales must be \[E="):
        call(spec, q, x, ids, wts, w_out=replace(q.w_out, scales=q.w_out.scales[:, :-1]))
    with pytest.raises(RuntimeError, match="needs w_in_zeros"):
        call(spec, q, x, ids, wts, w_in=replace(q.w_in, zeros=None))
    with pytest.raises(RuntimeError, match=r"w_out_zeros must be \[E="):
        call(spec, q, x, ids, wts, w_out=replace(q.w_out, zeros=q.w_out.zeros[:1]))
    spec8, q8, x8, ids8, wts8 = op_args("fp8-block")
    with pytest.raises(RuntimeError, match="w_in_scales must be Float"):
        call(spec8, q8, x8, ids8, wts8, w_in=replace(q8.w_in, scales=q8.w_in.scales.half()))
    with pytest.raises(RuntimeError, match="zeros given"):
        call(spec8, q8, x8, ids8, wts8, w_in=replace(q8.w_in, zeros=q.w_in.zeros))


def test_bad_format_parameters_are_refused():
    _, q, x, ids, wts = op_args("int4-g32")
    op = torch.ops.moecap.moe_experts_cpu_q
    a, b = q.w_in, q.w_out
    base = [x, a.codes, a.scales, None, b.codes, b.scales, None, ids, wts]
    with pytest.raises(RuntimeError, match="fmt must be"):
        op(*base, 9, 32, 1, True, 0)
    with pytest.raises(RuntimeError, match="group_size dividing"):
        op(*base, 2, 24, 1, True, 0)
    with pytest.raises(RuntimeError, match="expert id 6"):
        op(*base[:7], torch.full_like(ids, 6), wts, 2, 32, 1, True, 0)
    with pytest.raises(RuntimeError, match="x must be bfloat16, float16 or float32"):
        op(x.double(), *base[1:], 2, 32, 1, True, 0)
