"""A plain torch quantizer and dequantizer for the formats of ``formats.py``: round to nearest, one
scale per block from its largest magnitude, done once before timing. The kernels read what this
writes; the float64 references read what ``dequantize`` gives back.

Scales: int8 ``amax / 127``; int4 symmetric ``amax / 7`` (codes −8…7 stored as 0…15), int4 with
zero points ``(max − min) / 15`` over a range that includes 0, zero point ``round(−min / s)``;
fp8 ``amax / 448`` (e4m3's largest finite value); mxfp4 ``2^(⌊log2 amax⌋ − 2)`` as the OCP MX
specification sets it (e2m1's largest power of two is 2^2), values beyond ±6 saturating. A block
of zeros gets scale 1 (fp8, int) or 2^0 (mxfp4). Scales are rounded to their stored dtype before
the codes are chosen, so that the codes are the nearest for the scale actually stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moecap_kernels.quant.formats import WeightFormat

E4M3_MAX = 448.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0…7; bit 3 is the sign
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_SCALE_TORCH = {"float32": torch.float32, "float16": torch.float16, "e8m0": torch.uint8}


@dataclass(frozen=True)
class QuantizedMatrix:
    """E experts' [R, K] matrices in ``fmt``: codes [E, R, K·bits/8], scales [E, row blocks, K
    groups], zero points [E, R, ⌈groups / 2⌉] or None; ``projection_rows`` rows make one projection
    (F for a gated input matrix's gate and up halves, else R)."""

    fmt: WeightFormat
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    rows: int
    cols: int
    projection_rows: int

    @property
    def experts(self) -> int:
        return self.codes.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the codes, scales and zero points: what a kernel reads for all E matrices."""
        tensors = (self.codes, self.scales, self.zeros)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def block_of_row(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 [R]: the scale row of every matrix row (blocks counted within each projection)."""
        return row_blocks(self.fmt, self.rows, self.projection_rows, device)

    def dequantize(
        self, expert: int, dtype: torch.dtype = torch.float64, compute: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """Expert ``expert``'s [R, K] matrix, computed in ``compute`` (float64: exact) and returned in
        ``dtype``."""
        values = code_values(self.fmt, self.codes[expert], self.cols).to(compute)
        group = self.fmt.group(self.cols)
        k_group = torch.arange(self.cols, device=values.device) // group
        if self.zeros is not None:
            zeros = unpack_nibbles(self.zeros[expert], 2 * self.zeros.shape[-1]).to(compute)
            values = values - zeros[:, k_group]
        scales = scale_values(self.fmt, self.scales[expert]).to(compute)[self.block_of_row(values.device)]
        return (values * scales[:, k_group]).to(dtype)


@dataclass(frozen=True)
class QuantizedExperts:
    """The routed and shared experts of one layer in one format (router and biases stay dense)."""

    w_in: QuantizedMatrix
    w_out: QuantizedMatrix
    shared_w_in: QuantizedMatrix
    shared_w_out: QuantizedMatrix

    @property
    def fmt(self) -> WeightFormat:
        return self.w_in.fmt

    def matrices(self) -> tuple[QuantizedMatrix, ...]:
        return self.w_in, self.w_out, self.shared_w_in, self.shared_w_out


# --- shared pieces -------------------------------------------------------------------------------


def row_blocks(
    fmt: WeightFormat, rows: int, projection_rows: int, device: torch.device | str
) -> torch.Tensor:
    """int64 [rows]: the scale row of each row, blocks of ``fmt.block_rows`` within each projection."""
    per = projection_rows if fmt.block_rows == 0 else fmt.block_rows
    r = torch.arange(rows, device=device)
    return (r // projection_rows) * math.ceil(projection_rows / per) + (r % projection_rows) // per


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] of values 0…15 (n even) → uint8 [..., n / 2], element 2j in byte j's low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of ``pack_nibbles``: uint8 [..., n] (the first n of 2 × the bytes)."""
    both = torch.stack((packed & 0xF, packed >> 4), dim=-1)
    return both.flatten(-2)[..., :n]


def code_values(fmt: WeightFormat, codes: torch.Tensor, cols: int) -> torch.Tensor:
    """float32 [R, K]: what each code stands for before scaling (symmetric int4 already minus 8)."""
    if fmt.codes == "int8":
        return codes.float()
    if fmt.codes == "e4m3":
        return codes.view(torch.float8_e4m3fn).float()
    nibbles = unpack_nibbles(codes, cols)
    if fmt.codes == "uint4":
        return nibbles.float() - (0.0 if fmt.zero_points else 8.0)
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), device=codes.device)
    return table[nibbles.long()]


def scale_values(fmt: WeightFormat, scales: torch.Tensor) -> torch.Tensor:
    """float64 scales (e8m0 bytes s → 2^(s − 127))."""
    if fmt.scale_dtype == "e8m0":
        return torch.pow(2.0, scales.double() - 127.0)
    return scales.double()


# --- quantizing ----------------------------------------------------------------------------------


def _group_extremes(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) over each row's groups of ``group`` columns, [R, ⌈K / group⌉] (a partial last group
    padded with zeros, which change neither extreme once 0 is included)."""
    rows, cols = w.shape
    padded = torch.nn.functional.pad(w, (0, -cols % group))
    grouped = padded.view(rows, -1, group)
    return grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)


def _block_reduce(per_row: torch.Tensor, fmt: WeightFormat, projection_rows: int, largest: bool):
    """[R, G] reduced over the rows of each scale block (max or min): [row blocks, G]."""
    per = projection_rows if fmt.block_rows == 0 else fmt.block_rows
    if per == 1:
        return per_row
    parts = []
    for projection in per_row.split(projection_rows):
        padded = torch.nn.functional.pad(projection, (0, 0, 0, -projection_rows % per))  # zeros: neutral
        grouped = padded.view(-1, per, per_row.shape[1])
        parts.append(grouped.amax(1) if largest else grouped.amin(1))
    return torch.cat(parts)


def _quantize_one(w: torch.Tensor, fmt: WeightFormat, blocks: torch.Tensor, projection_rows: int):
    """One expert's [R, K] matrix (float32): (codes [R, K·bits/8], scales [blocks, G], zeros or None)."""
    cols = w.shape[1]
    group = fmt.group(cols)
    low, high = _group_extremes(w, group)
    low = _block_reduce(low, fmt, projection_rows, largest=False)
    high = _block_reduce(high, fmt, projection_rows, largest=True)
    amax = torch.maximum(-low, high)
    k_group = torch.arange(cols, device=w.device) // group
    zeros = None
    if fmt.codes == "e2m1":
        exponent = torch.floor(torch.log2(amax.double().clamp(min=2.0**-126))) - 2
        stored = torch.where(amax > 0, exponent + 127, torch.full_like(exponent, 127)).clamp(1, 254)
        scales = stored.to(torch.uint8)
    else:
        top = {"int8": 127.0, "e4m3": E4M3_MAX, "uint4": 15.0 if fmt.zero_points else 7.0}[fmt.codes]
        span = (high - low) if fmt.zero_points else amax
        scales = torch.where(span > 0, span / top, torch.ones_like(span)).to(_SCALE_TORCH[fmt.scale_dtype])
    per_weight = scale_values(fmt, scales).float()[blocks][:, k_group]
    scaled = w / per_weight
    if fmt.codes == "int8":
        codes = scaled.round().clamp(-127, 127).to(torch.int8)
    elif fmt.codes == "e4m3":
        codes = scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    elif fmt.codes == "uint4" and fmt.zero_points:
        zero = (-low / scale_values(fmt, scales).float()).round().clamp(0, 15).to(torch.uint8)
        zeros = pack_nibbles(torch.nn.functional.pad(zero, (0, zero.shape[1] % 2)))
        codes = pack_nibbles((scaled.round() + zero.float()[:, k_group]).clamp(0, 15).to(torch.uint8))
    elif fmt.codes == "uint4":
        codes = pack_nibbles((scaled.round().clamp(-8, 7) + 8).to(torch.uint8))
    else:  # e2m1: the nearest of the 8 magnitudes (saturating at 6), sign in bit 3
        midpoints = torch.tensor(_E2M1_MIDPOINTS, device=w.device)
        magnitude = torch.bucketize(scaled.abs(), midpoints).to(torch.uint8)
        codes = pack_nibbles(magnitude | ((scaled < 0).to(torch.uint8) << 3))
    return codes, scales, zeros


def quantize_matrix(w: torch.Tensor, fmt: WeightFormat, projection_rows: int) -> QuantizedMatrix:
    """E stacked [R, K] matrices (any float dtype) in ``fmt``, one expert at a time (bounded memory).
    The spec has already refused shapes the format cannot store."""
    experts, rows, cols = w.shape
    blocks = row_blocks(fmt, rows, projection_rows, w.device)
    count = fmt.row_blocks(rows, projection_rows)
    parts = [_quantize_one(w[e].float(), fmt, blocks, projection_rows) for e in range(experts)]
    if not parts:  # no shared experts: empty tensors of the right shapes
        groups = math.ceil(cols / fmt.group(cols)) if cols else 0
        codes = torch.zeros(0, rows, cols * fmt.weight_bits // 8, dtype=torch.uint8, device=w.device)
        scales = torch.zeros(0, count, groups, dtype=_SCALE_TORCH[fmt.scale_dtype], device=w.device)
        zeros = torch.zeros(0, rows, (groups + 1) // 2, dtype=torch.uint8, device=w.device)
        zeros = zeros if fmt.zero_points else None
        return QuantizedMatrix(fmt, codes, scales, zeros, rows, cols, projection_rows)
    codes = torch.stack([p[0] for p in parts])
    scales = torch.stack([p[1] for p in parts])
    zeros = torch.stack([p[2] for p in parts]) if fmt.zero_points else None
    return QuantizedMatrix(fmt, codes, scales, zeros, rows, cols, projection_rows)
