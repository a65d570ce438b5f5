"""The quantizer: codes decoded by hand, round-trip error bounds per format, exact bytes, refusals."""

from __future__ import annotations

import math
import random

import pytest
import torch

from moecap_kernels.errors import UserError
from moecap_kernels.quant.formats import weight_format
from moecap_kernels.quant.layer import in_format
from moecap_kernels.quant.quantize import pack_nibbles, quantize_matrix, unpack_nibbles
from moecap_kernels.weights import random_weights
from tests.helpers import tiny_spec

FORMATS = ["int8", "w8a8", "int4-g16", "int4-g8-zp", "fp8-tensor", "fp8-channel", "fp8-block", "mxfp4"]


# --- decoding by hand: plain Python on the stored bytes, independent of quantize.py --------------


def e4m3_by_hand(byte: int) -> float:
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0:
        return sign * mantissa / 8 * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def e2m1_by_hand(nibble: int) -> float:
    sign = -1.0 if nibble & 0x8 else 1.0
    exponent, mantissa = (nibble >> 1) & 0x3, nibble & 0x1
    return sign * (mantissa / 2 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1))


def fp16_by_hand(bits: int) -> float:
    exponent, mantissa = (bits >> 10) & 0x1F, bits & 0x3FF
    sign = -1.0 if bits & 0x8000 else 1.0
    if exponent == 0:
        return sign * mantissa / 1024 * 2.0**-14
    return sign * (1 + mantissa / 1024) * 2.0 ** (exponent - 15)


def value_by_hand(name: str, m, e: int, r: int, k: int, projection: int) -> float:
    """Weight [e, r, k] of quantized matrix ``m`` from its raw bytes, by the formats' definitions."""
    codes = m.codes[e, r].view(torch.uint8).tolist()
    scales = m.scales[e]
    if name.startswith("int4"):
        group = int(name.split("-g")[1].split("-")[0])
        nibble = (codes[k // 2] >> (4 * (k % 2))) & 0xF
        scale = fp16_by_hand(scales[r, k // group].view(torch.int16).item() & 0xFFFF)
        if name.endswith("-zp"):
            g = k // group
            zero = (m.zeros[e, r, g // 2].item() >> (4 * (g % 2))) & 0xF
            return (nibble - zero) * scale
        return (nibble - 8) * scale
    if name == "mxfp4":
        nibble = (codes[k // 2] >> (4 * (k % 2))) & 0xF
        return e2m1_by_hand(nibble) * 2.0 ** (scales[r, k // 32].item() - 127)
    code = codes[k]
    value = (code - 256 if code > 127 else code) if name in ("int8", "w8a8") else e4m3_by_hand(code)
    if name == "fp8-tensor":
        return value * scales[r // projection, 0].item()
    if name == "fp8-block":
        per = math.ceil(projection / 128)
        return value * scales[(r // projection) * per + (r % projection) // 128, k // 128].item()
    return value * scales[r, 0].item()


@pytest.mark.parametrize("name", FORMATS)
def test_dequantize_equals_decoding_the_bytes_by_hand(name: str) -> None:
    fmt = weight_format(name)
    rows, cols, projection = (2 * 136, 160, 136) if name == "fp8-block" else (2 * 12, 64, 12)
    w = torch.randn(2, rows, cols, generator=torch.Generator().manual_seed(1)) * 0.05
    m = quantize_matrix(w, fmt, projection)
    rng = random.Random(name)
    for _ in range(60):
        e, r, k = rng.randrange(2), rng.randrange(rows), rng.randrange(cols)
        by_hand = value_by_hand(name, m, e, r, k, projection)
        assert m.dequantize(e)[r, k].item() == pytest.approx(by_hand, rel=1e-12, abs=1e-30)


# --- round trips ---------------------------------------------------------------------------------


def _round_trip(name: str, w: torch.Tensor, projection: int):
    m = quantize_matrix(w, weight_format(name), projection)
    return m, torch.stack([m.dequantize(e) for e in range(w.shape[0])])


@pytest.mark.parametrize("name", ["int8", "int4-g16", "int4-g8-zp"])
def test_integer_codes_are_within_half_a_step(name: str) -> None:
    """|w − deq| ≤ scale / 2 for every weight (nearest code; the range covers every weight)."""
    w = torch.randn(3, 20, 48, generator=torch.Generator().manual_seed(2)).double()
    m, back = _round_trip(name, w, 20)
    group = weight_format(name).group(48)
    scale = m.scales.double().repeat_interleave(group, dim=-1) if group < 48 else m.scales.double()
    assert ((w - back).abs() <= scale / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("name", ["fp8-tensor", "fp8-channel", "fp8-block"])
def test_e4m3_keeps_three_mantissa_bits(name: str) -> None:
    """Relative error ≤ 2^-4 for every weight whose scaled value is a normal e4m3 number."""
    w = torch.randn(2, 260, 200, generator=torch.Generator().manual_seed(3)).double()
    m, back = _round_trip(name, w, 130)
    scaled = (back / w).isfinite() & (m.codes.view(torch.uint8).view(2, 260, 200) & 0x78 != 0)
    error = ((w - back).abs() / w.abs())[scaled]
    assert error.max().item() <= 2.0**-4 * (1 + 1e-6)


def test_mxfp4_error_is_bounded_by_the_shared_exponent() -> None:
    """With X = 2^(s − 127): |w − deq| ≤ X up to 6·X (half of e2m1's widest step, 2), and ≤ 2·X
    beyond, where the largest magnitudes of a block (up to 8·X) saturate at 6·X."""
    w = torch.randn(2, 8, 96, generator=torch.Generator().manual_seed(4)).double()
    m, back = _round_trip("mxfp4", w, 8)
    x = torch.pow(2.0, m.scales.double() - 127).repeat_interleave(32, dim=-1)
    error = (w - back).abs()
    assert (error <= 2 * x).all()
    assert (error[w.abs() <= 6 * x] <= x[w.abs() <= 6 * x]).all()


@pytest.mark.parametrize("name", FORMATS)
def test_a_block_of_zeros_stays_zero(name: str) -> None:
    w = torch.randn(1, 128, 128, generator=torch.Generator().manual_seed(5))
    w[:, :, :64] = 0  # whole groups (and, for fp8-block, no whole block) of zeros
    _, back = _round_trip(name, w, 128)
    assert (back[:, :, :64] == 0).all() and back.isfinite().all()


def test_nibbles_pack_low_first_and_round_trip() -> None:
    codes = torch.tensor([[1, 2, 15, 0, 7, 9]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x0F, 0x97]]
    assert torch.equal(unpack_nibbles(packed, 6), codes)


# --- bytes and refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_stored_bytes_are_the_specs_bytes(name: str) -> None:
    """The tensors a kernel reads, nbytes summed, equal the spec's exact byte count."""
    spec = tiny_spec(
        hidden_size=64,
        intermediate_size=32,
        num_shared_experts=2,
        shared_intermediate_size=64,
        expert_bias=True,
    ).with_format(name)
    weights = in_format(random_weights(spec), spec)
    q = weights.quantized
    biases = (weights.w_in_bias[0].numel() + weights.w_out_bias[0].numel()) * spec.weight_bytes_per_param
    assert (q.w_in.nbytes + q.w_out.nbytes) // spec.num_experts + biases == spec.expert_weight_bytes
    shared = q.shared_w_in.nbytes + q.shared_w_out.nbytes
    assert shared == spec.num_shared_experts * spec.shared_expert_weight_bytes


@pytest.mark.parametrize(("name", "hidden"), [("int4-g128", 192), ("mxfp4", 48), ("int4-g32-zp", 80)])
def test_groups_that_do_not_divide_k_are_refused(name: str, hidden: int) -> None:
    with pytest.raises(UserError, match="groups are not padded"):
        tiny_spec(hidden_size=hidden, intermediate_size=256).with_format(name)


@pytest.mark.parametrize("name", ["int4-g3", "int4-g0", "int5", "fp8-block-64", "int4-g128-z"])
def test_unknown_formats_are_one_line(name: str) -> None:
    with pytest.raises(UserError) as info:
        weight_format(name)
    assert "\n" not in str(info.value)


def test_fp8_block_keeps_partial_blocks_per_projection() -> None:
    """F = 136: each of gate and up has 2 row blocks (128 + 8), not 3 over the stacked 272 rows."""
    spec = tiny_spec(hidden_size=200, intermediate_size=136).with_format("fp8-block")
    q = in_format(random_weights(spec), spec).quantized
    assert tuple(q.w_in.scales.shape[1:]) == (4, 2) and tuple(q.w_out.scales.shape[1:]) == (2, 2)


# What compression costs a whole layer: its float64 output with the dequantized weights against the
# unquantized one, on Gaussian weights and inputs (H = F = 256, 16 tokens). Measured on three seeds:
# int8 1.2–1.3e-2, w8a8 2.2–2.4e-2, int4-g128 0.21–0.23, int4-g128-zp 0.17–0.19, fp8-* 4.5–4.9e-2,
# mxfp4 0.20–0.21. The bounds sit about 1.5× above; the floors catch a quantizer that did nothing.
LAYER_ERROR = {
    "int8": (4e-3, 2e-2),
    "w8a8": (8e-3, 3.5e-2),
    "int4-g128": (0.1, 0.33),
    "int4-g128-zp": (0.08, 0.28),
    "fp8-tensor": (0.02, 0.07),
    "fp8-channel": (0.02, 0.07),
    "fp8-block": (0.02, 0.07),
    "mxfp4": (0.1, 0.31),
}


@pytest.mark.parametrize("name", list(LAYER_ERROR))
def test_what_compression_costs_a_layer_is_bounded_per_format(name: str) -> None:
    from moecap_kernels.reference import reference_forward, relative_error

    spec = tiny_spec(
        hidden_size=256, intermediate_size=256, num_shared_experts=1, shared_intermediate_size=128
    )
    spec = spec.with_dtype("float32").with_format(name)
    weights = in_format(random_weights(spec, seed=21), spec)
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(16, spec.hidden_size, generator=gen)
    ids = torch.stack([torch.randperm(spec.num_experts, generator=gen)[: spec.top_k] for _ in range(16)])
    topk_weights = torch.rand(16, spec.top_k, generator=gen)
    compressed = reference_forward(x, weights, spec, ids, topk_weights, dequantized=True)
    error = relative_error(compressed, reference_forward(x, weights, spec, ids, topk_weights))
    low, high = LAYER_ERROR[name]
    assert low < error < high
