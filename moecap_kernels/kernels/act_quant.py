"""Row-wise int8 quantization of activations, for ``w8a8``: one program per row.

Per row: scale = max |row| / 127 in float32 (1 for an all-zero row), codes = the row divided by
it (correctly rounded division), rounded half to even and clamped to ±127 — as
``reference.int8_rows`` prescribes. Rounding is built from ``floor`` (exact here: the quotients
are at most 127 in magnitude, where adding 0.5 cannot carry a float32 past an integer), so that
the interpreter and the compiled kernel run the same code. With ``HAS_IDS`` the rows are the
expert-sorted layout's (``align.py``): a padding row (pair id ≥ ``num_pairs``) is not read, and
gets zero codes and a zero scale, so that the outputs are fully defined.
"""

from __future__ import annotations

import triton.language as tl

from moecap_kernels.kernels.lazy_jit import lazy_jit


@lazy_jit
def _maximum(a, b):
    return tl.maximum(a, b)


@lazy_jit
def quantize_rows_kernel(
    src_ptr,
    codes_ptr,
    scales_ptr,
    pair_ids_ptr,
    num_pairs,
    width,
    stride_src,
    stride_codes,
    HAS_IDS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    src = src_ptr + row * stride_src
    codes = codes_ptr + row * stride_codes
    valid = True
    if HAS_IDS:
        valid = tl.load(pair_ids_ptr + row) < num_pairs
    if valid:
        peak = tl.full((BLOCK,), 0.0, tl.float32)
        for start in range(0, width, BLOCK):
            v = tl.load(src + start + offs, mask=start + offs < width, other=0.0).to(tl.float32)
            peak = tl.maximum(peak, tl.abs(v))
        amax = tl.reduce(peak, 0, _maximum)
        scale = tl.where(amax > 0.0, tl.math.div_rn(amax, 127.0), 1.0)
        for start in range(0, width, BLOCK):
            ok = start + offs < width
            q = tl.math.div_rn(tl.load(src + start + offs, mask=ok, other=0.0).to(tl.float32), scale)
            r = tl.floor(q + 0.5)
            odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
            r = tl.where(((r - q) == 0.5) & odd, r - 1.0, r)  # a tie rounded up to odd: down to even
            r = tl.minimum(tl.maximum(r, -127.0), 127.0)
            tl.store(codes + start + offs, r.to(tl.int8), mask=ok)
        tl.store(scales_ptr + row, scale)
    else:
        for start in range(0, width, BLOCK):
            tl.store(codes + start + offs, tl.full((BLOCK,), 0, tl.int8), mask=start + offs < width)
        tl.store(scales_ptr + row, 0.0)
