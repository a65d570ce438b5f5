"""Weight formats of an MoE layer's experts: what each stores per weight, per scale and per zero
point, and so exactly how many bytes an expert's matrices take. Pure Python (no torch): the spec
and the metrics use it.

A quantized matrix [R, K] (R output rows, K the reduction: H for gate/up, F for down) holds
codes ``q``, scales ``s`` and, for ``-zp`` formats, zero points ``z``; its value is

    w[r, k] = (value(q[r, k]) − z[r, k // G]) · s[block(r), k // G]

with ``G`` the group size along K (a whole row when the format has one scale per row) and
``block(r)`` the row block of ``block_rows`` rows, counted within each projection (gate, up and
down are each their own tensor in a checkpoint, so a block never straddles two of them).

- ``none``: the weight dtype itself;
- ``int8``: int8 codes, symmetric, one float32 scale per output row (channel);
- ``w8a8``: ``int8``'s weights, and activations quantized to int8 per token at run time (int8 GEMMs);
- ``int4-gN``: codes q + 8 for q ∈ [−8, 7], one float16 scale per N weights of a row along K;
- ``int4-gN-zp``: codes 0…15, a float16 scale and a 4-bit zero point per N weights along K;
- ``fp8-tensor`` / ``fp8-channel`` / ``fp8-block``: e4m3 (fn) codes, one float32 scale per
  projection, per output row, or per 128 × 128 block;
- ``mxfp4``: e2m1 codes, one e8m0 scale (2^(s − 127), one byte) per 32 weights of a row along K.

Layouts (``quantize.py`` writes them, the kernels read them): codes [E, R, K·bits/8], a 4-bit
row's byte j holding element 2j in its low nibble and 2j + 1 in the high one (GPTQ's nibble order
along K, stored row-major; mxfp4 as gpt-oss' checkpoints); scales [E, row blocks, ⌈K / G⌉]; zero
points [E, R, ⌈(K / G) / 2⌉], two per byte along the groups, low nibble first. Groups of the
``int4`` and ``mxfp4`` formats must divide K (other sizes are refused, not padded); ``fp8-block``
keeps the last, partial 128-block of a row or column, as DeepSeek-V3's scale grids do.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from moecap_kernels.errors import UserError

SCALE_BYTES = {"float32": 4, "float16": 2, "e8m0": 1}
FP8_BLOCK = 128
MX_GROUP = 32
MAX_GROUP = 1 << 16


@dataclass(frozen=True)
class WeightFormat:
    """One weight format; ``group_size`` 0 = one group per row, ``block_rows`` 0 = per projection."""

    name: str
    codes: str  # "dense", "int8", "uint4", "e4m3", "e2m1"
    weight_bits: int
    group_size: int = 0
    block_rows: int = 1
    scale_dtype: str = ""
    zero_points: bool = False
    int8_activations: bool = False

    @property
    def quantized(self) -> bool:
        return self.codes != "dense"

    @property
    def scale_bytes_each(self) -> int:
        return SCALE_BYTES[self.scale_dtype] if self.quantized else 0

    @property
    def compute_dtype(self) -> str | None:
        """The dtype the GEMMs run in when it is not the activations' (``w8a8``: int8), else None."""
        return "int8" if self.int8_activations else None

    def group(self, cols: int) -> int:
        """Weights per scale along K for a matrix of ``cols`` columns."""
        return cols if self.group_size == 0 else self.group_size

    def row_blocks(self, rows: int, projection_rows: int) -> int:
        """Scale rows of a matrix of ``rows`` rows made of projections of ``projection_rows`` rows."""
        per = projection_rows if self.block_rows == 0 else self.block_rows
        return (rows // projection_rows) * math.ceil(projection_rows / per)

    def check_shape(self, rows: int, cols: int, projection_rows: int, what: str) -> None:
        """Refuse, in one line, a matrix this format cannot store (groups that do not divide K)."""
        if rows % projection_rows:
            raise ValueError(f"{rows} rows are not whole projections of {projection_rows}")
        if self.quantized and self.group_size and self.block_rows == 1 and cols % self.group_size:
            raise UserError(
                f"{self.name} needs {what}'s reduction length ({cols}) to be a multiple of its group "
                f"size {self.group_size}; groups are not padded"
            )

    def code_bytes(self, rows: int, cols: int) -> int:
        return rows * cols * self.weight_bits // 8

    def scale_count(self, rows: int, cols: int, projection_rows: int) -> int:
        if not self.quantized:
            return 0
        return self.row_blocks(rows, projection_rows) * math.ceil(cols / self.group(cols))

    def zero_point_bytes(self, rows: int, cols: int) -> int:
        """Zero points: two 4-bit ones per byte along the groups of each row."""
        if not self.zero_points:
            return 0
        return rows * math.ceil(math.ceil(cols / self.group(cols)) / 2)

    def matrix_bytes(self, rows: int, cols: int, projection_rows: int, dense_bytes_per_weight: int) -> int:
        """Every byte a kernel must read for one [rows, cols] matrix in this format."""
        if not self.quantized:
            return rows * cols * dense_bytes_per_weight
        scales = self.scale_count(rows, cols, projection_rows) * self.scale_bytes_each
        return self.code_bytes(rows, cols) + scales + self.zero_point_bytes(rows, cols)

    def describe(self) -> str:
        """One phrase: codes, scales and zero points."""
        if not self.quantized:
            return "unquantized weights"
        per = {0: "projection", 1: "row"}.get(self.block_rows, f"{self.block_rows}×{self.group_size} block")
        if self.block_rows == 1 and self.group_size:
            per = f"{self.group_size} weights along K"
        text = f"{self.codes} codes, {self.scale_dtype} scale per {per}"
        if self.zero_points:
            text += ", 4-bit zero point per group"
        if self.int8_activations:
            text += ", activations int8 per token"
        return text


def int8_max_reduction(activation_max: int = 127) -> int:
    """The longest K whose w8a8 dot product, int8 weights (|w| ≤ 127) times activation codes of
    magnitude ≤ ``activation_max``, sums exactly in int32 (127: signed int8 activations; 255: the
    uint8 ones of a biased VNNI dot product)."""
    return (2**31 - 1) // (127 * activation_max)


NONE = WeightFormat("none", "dense", 0)
_FIXED = {
    "none": NONE,
    "int8": WeightFormat("int8", "int8", 8, 0, 1, "float32"),
    "w8a8": WeightFormat("w8a8", "int8", 8, 0, 1, "float32", int8_activations=True),
    "fp8-tensor": WeightFormat("fp8-tensor", "e4m3", 8, 0, 0, "float32"),
    "fp8-channel": WeightFormat("fp8-channel", "e4m3", 8, 0, 1, "float32"),
    "fp8-block": WeightFormat("fp8-block", "e4m3", 8, FP8_BLOCK, FP8_BLOCK, "float32"),
    "mxfp4": WeightFormat("mxfp4", "e2m1", 4, MX_GROUP, 1, "e8m0"),
}
_INT4 = re.compile(r"int4-g(\d+)(-zp)?")
FORMAT_NAMES = (*_FIXED, "int4-gN", "int4-gN-zp")
# What ``--quant all`` profiles: every format, int4 at the group size GPTQ/AWQ checkpoints use most.
ALL_FORMATS = (
    *("none", "int8", "w8a8", "int4-g128", "int4-g128-zp"),
    *("fp8-tensor", "fp8-channel", "fp8-block", "mxfp4"),
)


def weight_format(name: str) -> WeightFormat:
    """The format called ``name`` (``int4-g128``, ``fp8-block``…), or a one-line UserError."""
    key = name.strip().lower()
    if key in _FIXED:
        return _FIXED[key]
    match = _INT4.fullmatch(key)
    if match:
        group = int(match.group(1))
        if group < 2 or group % 2 or group > MAX_GROUP:
            raise UserError(f"weight format {name!r}: the group size must be even, from 2 to {MAX_GROUP}")
        zp = match.group(2) is not None
        return WeightFormat(f"int4-g{group}" + ("-zp" if zp else ""), "uint4", 4, group, 1, "float16", zp)
    raise UserError(
        f"unknown weight format {name!r}; choose from {', '.join(FORMAT_NAMES)} (N: the group size)"
    )
