// moecap::moe_experts_cpu_q: the fused routed-expert MLPs of moe_experts_cpu (cpu_moe.cpp) on
// quantized weights, dequantized inside the streaming row kernels: each activated expert's codes
// and scales are read once, and no dequantized copy of a weight is ever written to memory. The
// routing, blocking, phases and epilogue are the dense op's (cpu_moe_common.h).
//
// Schema:
//   moe_experts_cpu_q(Tensor x, Tensor w_in, Tensor w_in_scales, Tensor? w_in_zeros, Tensor w_out,
//                     Tensor w_out_scales, Tensor? w_out_zeros, Tensor topk_ids, Tensor topk_weights,
//                     int fmt, int group_size, int block_rows, bool gated, int activation,
//                     int max_isa=-1, Tensor? b_in=None, Tensor? b_out=None, float swiglu_alpha=1.702,
//                     float swiglu_limit=7.0, bool weights_on_input=False) -> Tensor
//   The layouts are moecap_kernels/quant/formats.py's: for a matrix of R rows and K columns (w_in:
//   R = F_in (2F when gated: gate rows, then up rows), K = H; w_out: R = H, K = F) codes
//   [E, R, K·bits/8], scales [E, row blocks, ⌈K / G⌉], zero points [E, R, ⌈groups / 2⌉] (uint8,
//   two 4-bit ones per byte, low nibble first); a 4-bit row's byte j holds element 2j in its low
//   nibble. G = group_size along K (0: the whole row); row blocks of block_rows rows (0: one per
//   projection) are counted within each projection (gate, up: F rows each; down: H rows), a
//   partial last block or group kept.
//   fmt: 0 int8 (w8a16: int8 codes, float32 scales), 1 w8a8 (the same weights; x and each
//   act(gate)·up row are quantized per row to int8, scale max|row| / 127 in fp32, codes rounded
//   half to even and clamped to ±127, before each projection), 2 int4 (uint8 nibbles q + 8,
//   float16 scales), 3 int4 with zero points (nibbles 0..15 minus the group's zero point, float16
//   scales), 4 e4m3fn (uint8 codes, float32 scales), 5 e2m1 (nibbles, e8m0 scales: uint8 s for
//   2^(s − 127)). Codes are int8 for fmt 0 and 1, uint8 otherwise.
//   Everything else (x, routing, activation, biases in x's dtype, weights_on_input, max_isa, the
//   result in x's dtype) is as moe_experts_cpu's schema says. Accumulation is fp32; with bfloat16
//   x the intermediate act(gate)·up is rounded to bfloat16 before the down projection, as the dense
//   op does (w8a8 instead quantizes the fp32 values to int8 directly, as its reference does);
//   float16 and float32 keep it in fp32.
//
// Row kernels (max_isa caps them as for the dense op; every format runs on every level):
//   0 scalar, 1 AVX2, and any (format, group) without a fast path below: the portable path, which
//     dequantizes one weight row into an fp32 buffer in L1/L2 and dots it against the rows.
//   2+ (AVX-512 F/BW/VL), any x dtype, fp32 activations:
//     int8: 16 codes → fp32 (vpmovsxbd, vcvtdq2ps), FMA; the row's scale after the dot.
//     e4m3: 16 codes → fp16 bits by a shift and a mask (an e4m3 code moved into a half's bits is
//       its value · 2^-8, subnormals included), vcvtph2ps, FMA; scale · 256 per group (a row, a
//       projection's row or 128 columns of a fp8-block's block) applied to the group's sum.
//     int4 (G a multiple of 32) and e2m1 (the same): 16 bytes → 32 values by vpermps from a
//       16-entry table (nibble → value), times the group's scale (minus the zero point), FMA
//       against x rows permuted per 32 columns (even columns, then odd ones).
//     w8a8 (with AVX512-VNNI): vpdpbusd on u8 x s8: activations biased by +128 to unsigned, and
//       128 · Σw subtracted per row, Σw computed inside the kernel by one more vpdpbusd of a row
//       of ones (shared by all the routed rows); both scales after the int32 sum, which is exact
//       while K · 255 · 127 < 2^31 (K ≤ 66311; larger K is refused).
//   3 (AVX-512 BF16), bfloat16 x: vdpbf16ps on dequantized bf16 weights (exact: int4 and e2m1
//     values are bf16 numbers):
//     int4 (G a multiple of 128): 64 bytes → 128 weights as the bf16 numbers 128 + nibble (the
//       nibble or'ed under the exponent of 128: one shift and one vpternlogd per 32), against x
//       rows permuted per 128 columns; per group s · (dot − (128 + z) · Σx_group), Σx per 128
//       columns stored with the prepared row (z = 8 without zero points).
//     e2m1 (G = 32): 64 bytes → 128 weights by vpermw from a 16-entry bf16 table; the 4 groups of
//       each 128 columns fall on 4 lanes each of the fp32 sums, scaled by one vector per 128.
//     (int8 stays on the fp32 kernel at this level: on Zen 4, splitting its codes into two bf16
//     nibble weights each for vdpbf16ps measured slower than vcvtdq2ps + FMA.)
//   With one routed row per expert (decode), the int8 and e4m3 kernels read 4 (int4, e2m1: 2)
//   interleaved parts of their rows side by side: several streams per thread keep more cache-line
//   misses in flight while the core decodes (0.6 → 0.7-0.8 of a streaming read at T = 1).
//   Fast paths decode e4m3's NaN codes (never written by the quantizer) as ±480 and e8m0's 0 and
//   255 as 0 and infinity; the portable path decodes them exactly. Weights are read where they lie
//   (no repacking at prepare time), so the portable path and the fast ones share one layout.
#include <torch/library.h>

#include <cstring>
#include <string>

#include "cpu_moe_common.h"

namespace moecap {
namespace {

using namespace moecap::cpu;

enum Format : int64_t { kInt8 = 0, kW8A8 = 1, kInt4 = 2, kInt4Zp = 3, kE4m3 = 4, kE2m1 = 5 };
constexpr int64_t kW8A8MaxK = 66311;  // K · 255 · 127 < 2^31
constexpr const char* kOp = "moe_experts_cpu_q";
constexpr int kStreams = 4;  // concurrent row streams of the fast kernels with one routed row
constexpr int kInt4Streams = 2;


// One quantized matrix of every expert, with what locates a row's codes, scales and zero points.
struct QMatrix {
  const uint8_t* codes;  // [E, rows, row_bytes]
  const void* scales;    // [E, blocks, groups]: float, half or e8m0 bytes by format
  const uint8_t* zeros;  // [E, rows, zero_bytes] or nullptr
  int64_t format, rows, cols, row_bytes;
  int64_t proj_rows, per, blocks;  // rows per projection, rows per scale block, blocks per expert
  int64_t group, groups, zero_bytes;

  int64_t block_of(int64_t r) const {
    return (r / proj_rows) * ((proj_rows + per - 1) / per) + (r % proj_rows) / per;
  }
  const uint8_t* row(int64_t e, int64_t r) const { return codes + (e * rows + r) * row_bytes; }
  int64_t scale_at(int64_t e, int64_t r) const { return (e * blocks + block_of(r)) * groups; }
  const uint8_t* zero_row(int64_t e, int64_t r) const { return zeros + (e * rows + r) * zero_bytes; }
  // The scale of group g of row r, as a float (exact for e8m0's whole range).
  float scale(int64_t e, int64_t r, int64_t g) const {
    const int64_t i = scale_at(e, r) + g;
    if (format == kInt4 || format == kInt4Zp) return static_cast<float>(static_cast<const half*>(scales)[i]);
    if (format == kE2m1) return std::ldexp(1.f, static_cast<int>(static_cast<const uint8_t*>(scales)[i]) - 127);
    return static_cast<const float*>(scales)[i];
  }
  int zero(int64_t e, int64_t r, int64_t g) const {
    const uint8_t b = zero_row(e, r)[g / 2];
    return g % 2 ? b >> 4 : b & 15;
  }
};

// e4m3fn: s eeee mmm, bias 7, no infinities, 0x7F / 0xFF NaN.
float e4m3_value(uint8_t b) {
  const int e = (b >> 3) & 15, m = b & 7;
  float v;
  if (e == 15 && m == 7) {
    v = std::nanf("");
  } else if (e == 0) {
    v = std::ldexp(static_cast<float>(m), -9);
  } else {
    v = std::ldexp(1.f + m / 8.f, e - 7);
  }
  return b & 0x80 ? -v : v;
}

struct E4m3Table {
  float v[256];
  E4m3Table() {
    for (int i = 0; i < 256; ++i) v[i] = e4m3_value(static_cast<uint8_t>(i));
  }
};
const E4m3Table kE4m3Table;
constexpr float kE2m1Values[16] = {0.f,  0.5f,  1.f,  1.5f,  2.f,  3.f,  4.f,  6.f,
                                   -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

template <class T>
inline float round_to(float v) {
  if constexpr (std::is_same_v<T, bf16>) return static_cast<float>(static_cast<bf16>(v));
  return v;
}

// w8a8's per-row quantization (reference.int8_rows): returns the scale, writes the codes.
inline float quantize_int8_row(const float* v, int64_t cols, int8_t* codes) {
  float amax = 0.f;
  for (int64_t k = 0; k < cols; ++k) amax = std::max(amax, std::fabs(v[k]));
  const float scale = amax > 0.f ? amax / 127.f : 1.f;
  for (int64_t k = 0; k < cols; ++k) {
    const double q = std::nearbyint(static_cast<double>(v[k]) / static_cast<double>(scale));
    codes[k] = static_cast<int8_t>(std::max(-127.0, std::min(127.0, q)));
  }
  return scale;
}

// ---------------------------------------------------------------------------------------------
// The portable family: a weight row dequantized into fp32, then dotted (8 lanes per token).
// ---------------------------------------------------------------------------------------------
__attribute__((always_inline)) inline void dequant_row(const QMatrix& m, int64_t e, int64_t r, float* out) {
  const uint8_t* c = m.row(e, r);
  const int64_t K = m.cols, G = m.group;
  for (int64_t g = 0; g < m.groups; ++g) {
    const float s = m.scale(e, r, g);
    const int64_t k0 = g * G, k1 = std::min(K, k0 + G);
    switch (m.format) {
      case kInt8:
      case kW8A8:
        for (int64_t k = k0; k < k1; ++k) out[k] = static_cast<float>(static_cast<int8_t>(c[k])) * s;
        break;
      case kE4m3:
        for (int64_t k = k0; k < k1; ++k) out[k] = kE4m3Table.v[c[k]] * s;
        break;
      case kE2m1:
        for (int64_t k = k0; k < k1; ++k) out[k] = kE2m1Values[(c[k / 2] >> (4 * (k & 1))) & 15] * s;
        break;
      default: {
        const int z = m.format == kInt4Zp ? m.zero(e, r, g) : 8;
        for (int64_t k = k0; k < k1; ++k)
          out[k] = static_cast<float>(static_cast<int>((c[k / 2] >> (4 * (k & 1))) & 15) - z) * s;
      }
    }
  }
}

template <int N>
__attribute__((always_inline)) inline void portable_body(const QMatrix& m, int64_t e, int64_t r0, int64_t n_rows,
                                                         const float* const* x, float* out) {
  constexpr int L = 8;
  thread_local std::vector<float> buffer;
  const int64_t K = m.cols;
  if (static_cast<int64_t>(buffer.size()) < K) buffer.resize(static_cast<size_t>(K));
  float* w = buffer.data();
  for (int64_t r = 0; r < n_rows; ++r) {
    dequant_row(m, e, r0 + r, w);
    float acc[N][L] = {};
    int64_t k = 0;
    for (; k + L <= K; k += L)
      for (int n = 0; n < N; ++n)
        for (int l = 0; l < L; ++l) acc[n][l] += w[k + l] * x[n][k + l];
    for (; k < K; ++k)
      for (int n = 0; n < N; ++n) acc[n][0] += w[k] * x[n][k];
    for (int n = 0; n < N; ++n) {
      float s = 0.f;
      for (int l = 0; l < L; ++l) s += acc[n][l];
      out[r * N + n] = s;
    }
  }
}

template <int N>
__attribute__((noinline)) void portable_scalar(const QMatrix& m, int64_t e, int64_t r0, int64_t n, const float* const* x,
                                               float* out) {
  portable_body<N>(m, e, r0, n, x, out);
}
#if MOECAP_X86
template <int N>
MOECAP_TARGET_AVX2 __attribute__((noinline)) void portable_avx2(const QMatrix& m, int64_t e, int64_t r0, int64_t n,
                                                                const float* const* x, float* out) {
  portable_body<N>(m, e, r0, n, x, out);
}
template <int N>
MOECAP_TARGET_AVX512 __attribute__((noinline)) void portable_avx512(const QMatrix& m, int64_t e, int64_t r0,
                                                                    int64_t n, const float* const* x, float* out) {
  portable_body<N>(m, e, r0, n, x, out);
}
#endif

// Fields every family shares; A8: w8a8's activations (rounded to int8 codes × scale here).
template <class TT, class AT>
struct QFamily {
  using T = TT;
  using A = AT;
  using Matrix = QMatrix;
  static int64_t row_bytes(const Matrix& m) { return m.row_bytes; }
};

template <class TT, bool A8, Isa I>
struct PortableKernel : QFamily<TT, float> {
  static int64_t row_elems(int64_t cols) { return cols; }
  static void prepare_row(const float* v, int64_t cols, float* row) {
    if constexpr (A8) {  // int8 codes straight from the fp32 values (no bf16 rounding first)
      std::vector<int8_t> codes(static_cast<size_t>(cols));
      const float scale = quantize_int8_row(v, cols, codes.data());
      for (int64_t k = 0; k < cols; ++k) row[k] = static_cast<float>(codes[k]) * scale;
    } else {
      for (int64_t k = 0; k < cols; ++k) row[k] = round_to<TT>(v[k]);
    }
  }
  template <int N>
  static void rows(const QMatrix& m, int64_t e, int64_t r0, int64_t n_rows, int64_t, const float* const* x,
                   float* out) {
#if MOECAP_X86
    if constexpr (I >= kAvx512) {
      portable_avx512<N>(m, e, r0, n_rows, x, out);
    } else if constexpr (I == kAvx2) {
      portable_avx2<N>(m, e, r0, n_rows, x, out);
    } else {
      portable_scalar<N>(m, e, r0, n_rows, x, out);
    }
#else
    portable_scalar<N>(m, e, r0, n_rows, x, out);
#endif
  }
};

#if MOECAP_X86
#define MOECAP_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// ---------------------------------------------------------------------------------------------
// int8 and e4m3 with fp32 activations: 16 codes → 16 fp32 weights, FMA, scale per group.
// ---------------------------------------------------------------------------------------------
struct DecodeInt8 {
  static constexpr float kScale = 1.f;
  MOECAP_TARGET_AVX512 static __m512 load(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  MOECAP_TARGET_AVX512 static __m512 load(const uint8_t* p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
  }
};

// e4m3 bits s eeee mmm sign-extended to 16 bits, shifted left by 7 and masked with 0xBF80, are the
// half s 0eeee mmm0000000: the code's value · 2^-8 (normal and subnormal alike).
struct DecodeE4m3 {
  static constexpr float kScale = 256.f;
  MOECAP_TARGET_AVX512 static __m512 widen(__m128i b) {
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7), _mm256_set1_epi16(-16512));
    return _mm512_cvtph_ps(h);
  }
  MOECAP_TARGET_AVX512 static __m512 load(const uint8_t* p) {
    return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  MOECAP_TARGET_AVX512 static __m512 load(const uint8_t* p, __mmask16 m) { return widen(_mm_maskz_loadu_epi8(m, p)); }
};

// R rows at once (rows[i] of the matrix to out[i * N + n]): R concurrent streams sharing x's loads.
template <class D, int N, int R>
MOECAP_TARGET_AVX512 __attribute__((always_inline)) inline void bytes_f32_body(const QMatrix& m, int64_t e,
                                                                              const int64_t* rows,
                                                                              const float* const* x, float* out,
                                                                              const char* end) {
  constexpr int U = R * N <= 2 ? 4 : 2;
  const int64_t K = m.cols, G = m.group;
  const float* scales = static_cast<const float*>(m.scales);
  const uint8_t* c[R];
  const float* srow[R];
  for (int i = 0; i < R; ++i) {
    c[i] = m.row(e, rows[i]);
    srow[i] = scales + m.scale_at(e, rows[i]);
  }
  __m512 total[R][N];
  for (int i = 0; i < R; ++i)
    for (int n = 0; n < N; ++n) total[i][n] = _mm512_setzero_ps();
  for (int64_t g = 0, k0 = 0; k0 < K; ++g, k0 += G) {
    const int64_t k1 = std::min(K, k0 + G);
    __m512 acc[R][N][U];
    for (int i = 0; i < R; ++i)
      for (int n = 0; n < N; ++n)
        for (int u = 0; u < U; ++u) acc[i][n][u] = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + 16 * U <= k1; k += 16 * U)
      for (int u = 0; u < U; ++u) {
        __m512 wv[R];
        for (int i = 0; i < R; ++i) {
          if ((u * 16) % 64 == 0) prefetch_ahead(c[i] + k + 16 * u, end);
          wv[i] = D::load(c[i] + k + 16 * u);
        }
        for (int n = 0; n < N; ++n) {
          const __m512 xv = _mm512_loadu_ps(x[n] + k + 16 * u);
          for (int i = 0; i < R; ++i) acc[i][n][u] = _mm512_fmadd_ps(wv[i], xv, acc[i][n][u]);
        }
      }
    for (; k < k1; k += 16) {  // the group's last 16-column steps, the very last one masked
      const __mmask16 mk = k1 - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (k1 - k)) - 1u);
      for (int n = 0; n < N; ++n) {
        const __m512 xv = _mm512_maskz_loadu_ps(mk, x[n] + k);
        for (int i = 0; i < R; ++i) acc[i][n][0] = _mm512_fmadd_ps(D::load(c[i] + k, mk), xv, acc[i][n][0]);
      }
    }
    for (int i = 0; i < R; ++i) {
      const __m512 sv = _mm512_set1_ps(srow[i][g] * D::kScale);
      for (int n = 0; n < N; ++n) {
        for (int u = 1; u < U; ++u) acc[i][n][0] = _mm512_add_ps(acc[i][n][0], acc[i][n][u]);
        total[i][n] = _mm512_fmadd_ps(acc[i][n][0], sv, total[i][n]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int n = 0; n < N; ++n) out[i * N + n] = _mm512_reduce_add_ps(total[i][n]);
}

// Rows r0 .. r0 + n_rows in R interleaved parts (r, r + part, ...), read side by side, then the
// rows left over one at a time. body(std::integral_constant<int, S>, rows, res) computes S rows
// (rows[i] of the matrix) into res[i * N + n]. Several concurrent streams per thread keep more
// cache-line misses in flight while the core decodes (measured: 0.6 → 0.7+ of a streaming read
// at T = 1).
template <int N, int R, class Body>
__attribute__((always_inline)) inline void interleaved_rows(int64_t r0, int64_t n_rows, float* out, Body&& body) {
  int64_t r = 0;
  if constexpr (R > 1) {
    const int64_t part = n_rows / R;
    for (; r < part; ++r) {
      int64_t rows[R];
      for (int i = 0; i < R; ++i) rows[i] = r0 + r + i * part;
      float res[R * N];
      body(std::integral_constant<int, R>{}, rows, res);
      for (int i = 0; i < R; ++i)
        for (int n = 0; n < N; ++n) out[(r + i * part) * N + n] = res[i * N + n];
    }
    r = R * part;
  }
  for (; r < n_rows; ++r) {
    const int64_t row = r0 + r;
    body(std::integral_constant<int, 1>{}, &row, out + r * N);
  }
}

// One routed row: kStreams interleaved parts; two routed rows: two parts.
template <class D, int N>
MOECAP_TARGET_AVX512 __attribute__((noinline)) void rows_bytes_f32(const QMatrix& m, int64_t e, int64_t r0,
                                                                   int64_t n_rows, const float* const* x, float* out,
                                                                   const char* end) {
  constexpr int R = N == 1 ? kStreams : (N == 2 ? 2 : 1);
  interleaved_rows<N, R>(r0, n_rows, out, [&](auto streams, const int64_t* rows, float* res) MOECAP_TARGET_AVX512 {
    bytes_f32_body<D, N, decltype(streams)::value>(m, e, rows, x, res, end);
  });
}

template <class TT, class D>
struct BytesF32Kernel : QFamily<TT, float> {
  static int64_t row_elems(int64_t cols) { return cols; }
  static void prepare_row(const float* v, int64_t cols, float* row) {
    for (int64_t k = 0; k < cols; ++k) row[k] = round_to<TT>(v[k]);
  }
  template <int N>
  static void rows(const QMatrix& m, int64_t e, int64_t r0, int64_t n_rows, int64_t r_end, const float* const* x,
                   float* out) {
    rows_bytes_f32<D, N>(m, e, r0, n_rows, x, out, reinterpret_cast<const char*>(m.row(e, r_end)));
  }
};

// ---------------------------------------------------------------------------------------------
// 4-bit codes with fp32 activations: 16 bytes → 32 weights (even columns, odd columns) by a
// 16-entry vpermps table, scaled per group (G a multiple of 32); x permuted per 32 columns.
// ---------------------------------------------------------------------------------------------
template <int N>
MOECAP_TARGET_AVX512 __attribute__((noinline)) void rows_nibble_f32(const QMatrix& m, int64_t e, int64_t r0,
                                                                    int64_t n_rows, const float* const* x, float* out,
                                                                    const char* end) {
  const int64_t K = m.cols, G = m.group;
  alignas(64) float table[16];
  for (int i = 0; i < 16; ++i) table[i] = m.format == kE2m1 ? kE2m1Values[i] : static_cast<float>(i);
  const __m512 lut = _mm512_load_ps(table);
  const __m512i low = _mm512_set1_epi32(15);
  for (int64_t r = 0; r < n_rows; ++r) {
    const uint8_t* c = m.row(e, r0 + r);
    __m512 acc[N][4];
    for (int n = 0; n < N; ++n)
      for (int u = 0; u < 4; ++u) acc[n][u] = _mm512_setzero_ps();
    for (int64_t g = 0, k0 = 0; k0 < K; ++g, k0 += G) {
      const float s = m.scale(e, r0 + r, g);
      const float zs = m.format == kInt4Zp ? m.zero(e, r0 + r, g) * s : (m.format == kInt4 ? 8.f * s : 0.f);
      const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(zs);
      for (int64_t k = k0; k < k0 + G; k += 64) {
        const int parts = k + 64 <= k0 + G ? 2 : 1;
        prefetch_ahead(c + k / 2, end);
        for (int p = 0; p < parts; ++p) {
          const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k / 2 + 16 * p)));
          const __m512 ve = _mm512_fmsub_ps(_mm512_permutexvar_ps(_mm512_and_si512(b, low), lut), sv, zv);
          const __m512 vo = _mm512_fmsub_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut), sv, zv);
          for (int n = 0; n < N; ++n) {
            const float* xp = x[n] + k + 32 * p;
            acc[n][2 * p] = _mm512_fmadd_ps(ve, _mm512_loadu_ps(xp), acc[n][2 * p]);
            acc[n][2 * p + 1] = _mm512_fmadd_ps(vo, _mm512_loadu_ps(xp + 16), acc[n][2 * p + 1]);
          }
        }
      }
    }
    for (int n = 0; n < N; ++n) {
      const __m512 a = _mm512_add_ps(_mm512_add_ps(acc[n][0], acc[n][1]), _mm512_add_ps(acc[n][2], acc[n][3]));
      out[r * N + n] = _mm512_reduce_add_ps(a);
    }
  }
}

template <class TT>
struct NibbleF32Kernel : QFamily<TT, float> {
  static int64_t row_elems(int64_t cols) { return cols; }  // a multiple of 32
  static void prepare_row(const float* v, int64_t cols, float* row) {
    for (int64_t b = 0; b < cols; b += 32)
      for (int j = 0; j < 16; ++j) {
        row[b + j] = round_to<TT>(v[b + 2 * j]);
        row[b + 16 + j] = round_to<TT>(v[b + 2 * j + 1]);
      }
  }
  template <int N>
  static void rows(const QMatrix& m, int64_t e, int64_t r0, int64_t n_rows, int64_t r_end, const float* const* x,
                   float* out) {
    rows_nibble_f32<N>(m, e, r0, n_rows, x, out, reinterpret_cast<const char*>(m.row(e, r_end)));
  }
};

// ---------------------------------------------------------------------------------------------
// w8a8 with AVX512-VNNI. A prepared row: K codes + 128 (uint8), zero padding to a multiple of 64,
// then the row's fp32 scale (and padding to keep rows 64-byte multiples).
// ---------------------------------------------------------------------------------------------
template <int N>
MOECAP_TARGET_VNNI __attribute__((noinline)) void rows_w8a8(const QMatrix& m, int64_t e, int64_t r0, int64_t n_rows,
                                                            const uint8_t* const* x, float* out, const char* end) {
  constexpr int U = unroll<N>();
  const int64_t K = m.cols, padded = round_up(K, 64);
  const float* scales = static_cast<const float*>(m.scales);
  const __m512i ones = _mm512_set1_epi8(1);
  float xs[N];
  for (int n = 0; n < N; ++n) std::memcpy(&xs[n], x[n] + padded, sizeof(float));
  for (int64_t r = 0; r < n_rows; ++r) {
    const uint8_t* c = m.row(e, r0 + r);
    __m512i acc[N][U], sw[U];
    for (int u = 0; u < U; ++u) {
      sw[u] = _mm512_setzero_si512();
      for (int n = 0; n < N; ++n) acc[n][u] = _mm512_setzero_si512();
    }
    int64_t k = 0;
    for (; k + 64 * U <= K; k += 64 * U)
      for (int u = 0; u < U; ++u) {
        prefetch_ahead(c + k + 64 * u, end);
        const __m512i w = _mm512_loadu_si512(c + k + 64 * u);
        sw[u] = _mm512_dpbusd_epi32(sw[u], ones, w);
        for (int n = 0; n < N; ++n) acc[n][u] = _mm512_dpbusd_epi32(acc[n][u], _mm512_loadu_si512(x[n] + k + 64 * u), w);
      }
    for (; k < K; k += 64) {  // the last chunk masked: no byte past the row is read
      const __mmask64 mk = K - k >= 64 ? ~0ull : (1ull << (K - k)) - 1ull;
      const __m512i w = _mm512_maskz_loadu_epi8(mk, c + k);
      sw[0] = _mm512_dpbusd_epi32(sw[0], ones, w);
      for (int n = 0; n < N; ++n) acc[n][0] = _mm512_dpbusd_epi32(acc[n][0], _mm512_loadu_si512(x[n] + k), w);
    }
    for (int u = 1; u < U; ++u) sw[0] = _mm512_add_epi32(sw[0], sw[u]);
    const int64_t sum_w = _mm512_reduce_add_epi32(sw[0]);
    const float ws = scales[m.scale_at(e, r0 + r)];
    for (int n = 0; n < N; ++n) {
      for (int u = 1; u < U; ++u) acc[n][0] = _mm512_add_epi32(acc[n][0], acc[n][u]);
      const int64_t dot = static_cast<int64_t>(_mm512_reduce_add_epi32(acc[n][0])) - 128 * sum_w;
      out[r * N + n] = static_cast<float>(dot) * xs[n] * ws;
    }
  }
}

template <class TT>
struct W8A8Kernel : QFamily<TT, uint8_t> {
  static int64_t row_elems(int64_t cols) { return round_up(cols, 64) + 64; }
  static void prepare_row(const float* v, int64_t cols, uint8_t* row) {
    std::vector<int8_t> codes(static_cast<size_t>(cols));
    const float scale = quantize_int8_row(v, cols, codes.data());
    const int64_t padded = round_up(cols, 64);
    for (int64_t k = 0; k < cols; ++k) row[k] = static_cast<uint8_t>(codes[k] + 128);
    std::memset(row + cols, 0, static_cast<size_t>(padded - cols));
    std::memcpy(row + padded, &scale, sizeof(float));
  }
  template <int N>
  static void rows(const QMatrix& m, int64_t e, int64_t r0, int64_t n_rows, int64_t r_end, const uint8_t* const* x,
                   float* out) {
    rows_w8a8<N>(m, e, r0, n_rows, x, out, reinterpret_cast<const char*>(m.row(e, r_end)));
  }
};

// ---------------------------------------------------------------------------------------------
// bf16 activations, vdpbf16ps. Prepared rows are permuted per 128 columns: position 32i + j holds
// column 4j + i (i < 4, j < 32), the order in which 64 code bytes, read as 32 words, give up their
// nibbles (word j's nibble i is column 4j + i).
// ---------------------------------------------------------------------------------------------
inline void permute128(const float* v, int64_t cols, bf16* row) {
  for (int64_t b = 0; b < cols; b += 128)
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 32; ++j) row[b + 32 * i + j] = static_cast<bf16>(v[b + 4 * j + i]);
}

MOECAP_TARGET_BF16 inline __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// R rows of int4 at once (see rows_int4_bf16).
template <int N, int R>
MOECAP_TARGET_BF16 __attribute__((always_inline)) inline void int4_bf16_body(const QMatrix& m, int64_t e,
                                                                            const int64_t* rows,
                                                                            const bf16* const* x,
                                                                            const float* const* sums, float* out,
                                                                            const char* end) {
  const int64_t per_group = m.group / 128, groups = m.groups;
  const half* scales = static_cast<const half*>(m.scales);
  const bool zp = m.format == kInt4Zp;
  const __m512i nib = _mm512_set1_epi16(0x000F), exp128 = _mm512_set1_epi16(0x4300);
  const __m512i interleave = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const uint8_t* c[R];
  const half* srow[R];
  const uint8_t* zrow[R];
  for (int i = 0; i < R; ++i) {
    c[i] = m.row(e, rows[i]);
    srow[i] = scales + m.scale_at(e, rows[i]);
    zrow[i] = zp ? m.zero_row(e, rows[i]) : nullptr;
  }
  __m512 total[R][N], corr[R][N];
  for (int i = 0; i < R; ++i)
    for (int n = 0; n < N; ++n) total[i][n] = corr[i][n] = _mm512_setzero_ps();
  alignas(64) float sg[R][16];
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int64_t count = std::min<int64_t>(16, groups - g0);
    const __mmask16 gm = static_cast<__mmask16>((1u << count) - 1u);
    for (int i = 0; i < R; ++i) {
      const __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, srow[i] + g0));
      _mm512_store_ps(sg[i], sv);
      __m512 offset = _mm512_set1_ps(136.f);
      if (zp) {  // 8 bytes of zero points → 16 lanes: byte j's low nibble to lane 2j, high to 2j + 1
        const __mmask16 bm = static_cast<__mmask16>((1u << ((count + 1) / 2)) - 1u);
        const __m512i d = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(bm, zrow[i] + g0 / 2));
        const __m512i z = _mm512_permutex2var_epi32(_mm512_and_si512(d, _mm512_set1_epi32(15)), interleave,
                                                    _mm512_srli_epi32(d, 4));
        offset = _mm512_add_ps(_mm512_cvtepi32_ps(z), _mm512_set1_ps(128.f));
      }
      const __m512 cs = _mm512_mul_ps(sv, offset);
      for (int n = 0; n < N; ++n)
        corr[i][n] = _mm512_fmadd_ps(cs, _mm512_maskz_loadu_ps(gm, sums[n] + g0), corr[i][n]);
    }
    for (int64_t j = 0; j < count; ++j) {
      const int64_t g = g0 + j;
      __m512 acc[R][N][2];
      for (int i = 0; i < R; ++i)
        for (int n = 0; n < N; ++n) acc[i][n][0] = acc[i][n][1] = _mm512_setzero_ps();
      for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
        __m512i v[R][4];
        for (int i = 0; i < R; ++i) {
          const uint8_t* p = c[i] + 64 * b;
          prefetch_ahead(p, end);
          const __m512i w = _mm512_loadu_si512(p);
          v[i][0] = _mm512_ternarylogic_epi32(w, nib, exp128, 0xEA);  // (w & 0xF) | 0x4300
          v[i][1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), nib, exp128, 0xEA);
          v[i][2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), nib, exp128, 0xEA);
          v[i][3] = _mm512_or_si512(_mm512_srli_epi16(w, 12), exp128);
        }
        for (int n = 0; n < N; ++n) {
          const bf16* xb = x[n] + 128 * b;
          for (int q = 0; q < 4; ++q) {
            const __m512i xv = _mm512_loadu_si512(xb + 32 * q);
            for (int i = 0; i < R; ++i) acc[i][n][q & 1] = dot_bf16(acc[i][n][q & 1], v[i][q], xv);
          }
        }
      }
      for (int i = 0; i < R; ++i) {
        const __m512 s = _mm512_set1_ps(sg[i][j]);
        for (int n = 0; n < N; ++n)
          total[i][n] = _mm512_fmadd_ps(_mm512_add_ps(acc[i][n][0], acc[i][n][1]), s, total[i][n]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int n = 0; n < N; ++n) out[i * N + n] = _mm512_reduce_add_ps(_mm512_sub_ps(total[i][n], corr[i][n]));
}

// int4 (with or without zero points), G a multiple of 128. Weights 128 + nibble; a prepared row
// carries Σx per 128 columns (fp32) after its K bf16 values. Per row, the scales of 16 groups at a
// time are widened with vcvtph2ps and the correction Σ_g s_g (128 + z_g) Σx_g is summed in vectors.
// Rows in interleaved parts, as rows_bytes_f32.
template <int N>
MOECAP_TARGET_BF16 __attribute__((noinline)) void rows_int4_bf16(const QMatrix& m, int64_t e, int64_t r0,
                                                                 int64_t n_rows, const bf16* const* x, float* out,
                                                                 const char* end) {
  const int64_t K = m.cols, per_group = m.group / 128, groups = m.groups;
  thread_local std::vector<float> group_sums;  // Σx per group (the stored per-128 sums when G = 128)
  const float* sums[N];
  if (per_group == 1) {
    for (int n = 0; n < N; ++n) sums[n] = reinterpret_cast<const float*>(x[n] + K);
  } else {
    group_sums.resize(static_cast<size_t>(N * groups));
    for (int n = 0; n < N; ++n) {
      const float* blocks = reinterpret_cast<const float*>(x[n] + K);
      float* dst = group_sums.data() + n * groups;
      for (int64_t g = 0; g < groups; ++g) {
        float sx = 0.f;
        for (int64_t b = 0; b < per_group; ++b) sx += blocks[g * per_group + b];
        dst[g] = sx;
      }
      sums[n] = dst;
    }
  }
  constexpr int R = N == 1 ? kInt4Streams : (N == 2 ? 2 : 1);
  interleaved_rows<N, R>(r0, n_rows, out, [&](auto streams, const int64_t* rows, float* res) MOECAP_TARGET_BF16 {
    int4_bf16_body<N, decltype(streams)::value>(m, e, rows, x, sums, res, end);
  });
}

struct Int4Bf16Kernel : QFamily<bf16, bf16> {
  static int64_t row_elems(int64_t cols) { return cols + 2 * (cols / 128); }  // cols: a multiple of 128
  static void prepare_row(const float* v, int64_t cols, bf16* row) {
    permute128(v, cols, row);
    for (int64_t b = 0; b < cols / 128; ++b) {
      float s = 0.f;
      for (int k = 0; k < 128; ++k) s += round_to<bf16>(v[128 * b + k]);
      std::memcpy(row + cols + 2 * b, &s, sizeof(float));
    }
  }
  template <int N>
  static void rows(const QMatrix& m, int64_t e, int64_t r0, int64_t n_rows, int64_t r_end, const bf16* const* x,
                   float* out) {
    rows_int4_bf16<N>(m, e, r0, n_rows, x, out, reinterpret_cast<const char*>(m.row(e, r_end)));
  }
};

// e2m1 with e8m0 scales per 32 columns: fp32 lane l of a 128-column chunk's sums covers columns
// 8l..8l+7 of the permuted order's source, i.e. group l / 4 of the chunk.
template <int N, int R>
MOECAP_TARGET_BF16 __attribute__((always_inline)) inline void e2m1_bf16_body(const QMatrix& m, int64_t e,
                                                                            const int64_t* rows,
                                                                            const bf16* const* x, __m512i lut,
                                                                            float* out, const char* end) {
  const int64_t K = m.cols;
  const uint8_t* scales = static_cast<const uint8_t*>(m.scales);
  const __m512i nib = _mm512_set1_epi16(0x000F);
  const __m128i spread = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const uint8_t* c[R];
  const uint8_t* srow[R];
  for (int i = 0; i < R; ++i) {
    c[i] = m.row(e, rows[i]);
    srow[i] = scales + m.scale_at(e, rows[i]);
  }
  __m512 total[R][N];
  for (int i = 0; i < R; ++i)
    for (int n = 0; n < N; ++n) total[i][n] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / 128; ++b) {
    __m512i v[R][4];
    __m512 sv[R];
    for (int i = 0; i < R; ++i) {
      const uint8_t* p = c[i] + 64 * b;
      prefetch_ahead(p, end);
      const __m512i w = _mm512_loadu_si512(p);
      v[i][0] = _mm512_permutexvar_epi16(_mm512_and_si512(w, nib), lut);
      v[i][1] = _mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srli_epi16(w, 4), nib), lut);
      v[i][2] = _mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srli_epi16(w, 8), nib), lut);
      v[i][3] = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 12), lut);
      int32_t four;
      std::memcpy(&four, srow[i] + 4 * b, sizeof(four));
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi32_si128(four), spread));
      sv[i] = _mm512_castsi512_ps(_mm512_slli_epi32(bytes, 23));
    }
    for (int n = 0; n < N; ++n) {
      const bf16* xb = x[n] + 128 * b;
      const __m512i x0 = _mm512_loadu_si512(xb), x1 = _mm512_loadu_si512(xb + 32);
      const __m512i x2 = _mm512_loadu_si512(xb + 64), x3 = _mm512_loadu_si512(xb + 96);
      for (int i = 0; i < R; ++i) {
        const __m512 lo = dot_bf16(dot_bf16(_mm512_setzero_ps(), v[i][0], x0), v[i][1], x1);
        const __m512 hi = dot_bf16(dot_bf16(_mm512_setzero_ps(), v[i][2], x2), v[i][3], x3);
        total[i][n] = _mm512_fmadd_ps(_mm512_add_ps(lo, hi), sv[i], total[i][n]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int n = 0; n < N; ++n) out[i * N + n] = _mm512_reduce_add_ps(total[i][n]);
}

// Rows in interleaved parts, as rows_bytes_f32 (two for one routed row).
template <int N>
MOECAP_TARGET_BF16 __attribute__((noinline)) void rows_e2m1_bf16(const QMatrix& m, int64_t e, int64_t r0,
                                                                 int64_t n_rows, const bf16* const* x, float* out,
                                                                 const char* end) {
  alignas(64) uint16_t table[32];
  for (int i = 0; i < 32; ++i) {
    const bf16 v(kE2m1Values[i & 15]);
    std::memcpy(&table[i], &v, sizeof(uint16_t));
  }
  const __m512i lut = _mm512_load_si512(table);
  constexpr int R = N == 1 ? kInt4Streams : 1;
  interleaved_rows<N, R>(r0, n_rows, out, [&](auto streams, const int64_t* rows, float* res) MOECAP_TARGET_BF16 {
    e2m1_bf16_body<N, decltype(streams)::value>(m, e, rows, x, lut, res, end);
  });
}

struct E2m1Bf16Kernel : QFamily<bf16, bf16> {
  static int64_t row_elems(int64_t cols) { return cols; }  // a multiple of 128
  static void prepare_row(const float* v, int64_t cols, bf16* row) { permute128(v, cols, row); }
  template <int N>
  static void rows(const QMatrix& m, int64_t e, int64_t r0, int64_t n_rows, int64_t r_end, const bf16* const* x,
                   float* out) {
    rows_e2m1_bf16<N>(m, e, r0, n_rows, x, out, reinterpret_cast<const char*>(m.row(e, r_end)));
  }
};
#endif  // MOECAP_X86

// ---------------------------------------------------------------------------------------------
// Op entry: checks, matrices, family selection.
// ---------------------------------------------------------------------------------------------
bool four_bit(int64_t fmt) { return fmt == kInt4 || fmt == kInt4Zp || fmt == kE2m1; }

QMatrix make_matrix(const at::Tensor& codes, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                    int64_t fmt, int64_t group_size, int64_t block_rows, int64_t E, int64_t rows, int64_t cols,
                    int64_t proj_rows, const char* name) {
  const std::string n(name);
  const int64_t group = group_size == 0 ? cols : group_size;
  const int64_t groups = (cols + group - 1) / group;
  const int64_t per = block_rows == 0 ? proj_rows : block_rows;
  const int64_t blocks = (rows / proj_rows) * ((proj_rows + per - 1) / per);
  TORCH_CHECK(scales.device().is_cpu() && scales.is_contiguous(), kOp, ": ", n, "_scales must be a contiguous CPU tensor");
  const auto want = fmt == kE2m1 ? at::kByte : (fmt == kInt4 || fmt == kInt4Zp ? at::kHalf : at::kFloat);
  TORCH_CHECK(scales.scalar_type() == want, kOp, ": ", n, "_scales must be ", want, " for this format, got ",
              scales.scalar_type());
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == E && scales.size(1) == blocks && scales.size(2) == groups, kOp,
              ": ", n, "_scales must be [E=", E, ", row blocks=", blocks, ", groups=", groups, "], got ",
              scales.sizes());
  const int64_t zero_bytes = (groups + 1) / 2;
  const uint8_t* zp = nullptr;
  if (fmt == kInt4Zp) {
    TORCH_CHECK(zeros.has_value(), kOp, ": the int4 format with zero points needs ", n, "_zeros");
    TORCH_CHECK(zeros->device().is_cpu() && zeros->is_contiguous(), kOp, ": ", n,
                "_zeros must be a contiguous CPU tensor");
    TORCH_CHECK(zeros->scalar_type() == at::kByte, kOp, ": ", n, "_zeros must be uint8, got ", zeros->scalar_type());
    TORCH_CHECK(zeros->dim() == 3 && zeros->size(0) == E && zeros->size(1) == rows && zeros->size(2) == zero_bytes,
                kOp, ": ", n, "_zeros must be [E=", E, ", ", rows, ", ", zero_bytes, "], got ", zeros->sizes());
    zp = zeros->data_ptr<uint8_t>();
  } else {
    TORCH_CHECK(!zeros.has_value(), kOp, ": ", n, "_zeros given, but only fmt 3 (int4 with zero points) has them");
  }
  return {static_cast<const uint8_t*>(codes.data_ptr()),
          scales.data_ptr(),
          zp,
          fmt,
          rows,
          cols,
          codes.size(2),
          proj_rows,
          per,
          blocks,
          group,
          groups,
          zero_bytes};
}

void check_codes(const at::Tensor& c, int64_t fmt, const char* name) {
  check_cpu_contiguous(c, kOp, name);
  const auto want = fmt == kInt8 || fmt == kW8A8 ? at::kChar : at::kByte;
  TORCH_CHECK(c.scalar_type() == want, kOp, ": ", name, " codes must be ", want, " for fmt ", fmt, ", got ",
              c.scalar_type());
  TORCH_CHECK(c.dim() == 3, kOp, ": ", name, " codes must be 3-D [E, rows, bytes], got ", c.sizes());
}

template <class K>
at::Tensor run(const at::Tensor& x, const QMatrix& in, const QMatrix& out, int64_t F, const Routing& rt,
               const Epilogue& ep) {
  return run_experts<K>(x, in, out, F, rt, ep);
}

template <class T>
at::Tensor run_portable(int64_t isa, bool a8, const at::Tensor& x, const QMatrix& in, const QMatrix& out, int64_t F,
                        const Routing& rt, const Epilogue& ep) {
  if (a8) {
    if (isa >= kAvx512) return run<PortableKernel<T, true, kAvx512>>(x, in, out, F, rt, ep);
    if (isa == kAvx2) return run<PortableKernel<T, true, kAvx2>>(x, in, out, F, rt, ep);
    return run<PortableKernel<T, true, kScalar>>(x, in, out, F, rt, ep);
  }
  if (isa >= kAvx512) return run<PortableKernel<T, false, kAvx512>>(x, in, out, F, rt, ep);
  if (isa == kAvx2) return run<PortableKernel<T, false, kAvx2>>(x, in, out, F, rt, ep);
  return run<PortableKernel<T, false, kScalar>>(x, in, out, F, rt, ep);
}

bool has_vnni() {
#if MOECAP_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// The family for this format, group and ISA (fast paths need both matrices to fit them).
template <class T>
at::Tensor dispatch(int64_t isa, const at::Tensor& x, const QMatrix& in, const QMatrix& out, int64_t F,
                    const Routing& rt, const Epilogue& ep) {
  const int64_t fmt = in.format;
#if MOECAP_X86
  const bool bf16_path = isa >= kAvx512Bf16 && std::is_same_v<T, bf16>;
  auto groups_of = [&](int64_t multiple) { return in.group % multiple == 0 && out.group % multiple == 0; };
  if (isa >= kAvx512) {
    switch (fmt) {
      case kW8A8:
        if (has_vnni()) return run<W8A8Kernel<T>>(x, in, out, F, rt, ep);
        break;
      case kInt8: return run<BytesF32Kernel<T, DecodeInt8>>(x, in, out, F, rt, ep);
      case kE4m3:
        if ((in.group == in.cols || in.group % 16 == 0) && (out.group == out.cols || out.group % 16 == 0))
          return run<BytesF32Kernel<T, DecodeE4m3>>(x, in, out, F, rt, ep);
        break;
      case kE2m1:
        if constexpr (std::is_same_v<T, bf16>)
          if (bf16_path && in.group == 32 && out.group == 32 && in.cols % 128 == 0 && out.cols % 128 == 0)
            return run<E2m1Bf16Kernel>(x, in, out, F, rt, ep);
        if (groups_of(32)) return run<NibbleF32Kernel<T>>(x, in, out, F, rt, ep);
        break;
      default:  // int4, with or without zero points
        if constexpr (std::is_same_v<T, bf16>)
          if (bf16_path && groups_of(128)) return run<Int4Bf16Kernel>(x, in, out, F, rt, ep);
        if (groups_of(32)) return run<NibbleF32Kernel<T>>(x, in, out, F, rt, ep);
    }
  }
#endif
  return run_portable<T>(isa, fmt == kW8A8, x, in, out, F, rt, ep);
}

at::Tensor moe_experts_cpu_q(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_in_scales,
                             const std::optional<at::Tensor>& w_in_zeros, const at::Tensor& w_out,
                             const at::Tensor& w_out_scales, const std::optional<at::Tensor>& w_out_zeros,
                             const at::Tensor& topk_ids, const at::Tensor& topk_weights, int64_t fmt,
                             int64_t group_size, int64_t block_rows, bool gated, int64_t activation, int64_t max_isa,
                             const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out,
                             double swiglu_alpha, double swiglu_limit, bool weights_on_input) {
  check_x_and_routing(kOp, x, topk_ids, topk_weights, gated, activation);
  TORCH_CHECK(fmt >= kInt8 && fmt <= kE2m1, kOp,
              ": fmt must be 0 (int8), 1 (w8a8), 2 (int4), 3 (int4 with zero points), 4 (e4m3) or 5 (e2m1), got ",
              fmt);
  check_codes(w_in, fmt, "w_in");
  check_codes(w_out, fmt, "w_out");
  const int64_t bits = four_bit(fmt) ? 4 : 8;
  const int64_t H = x.size(1), E = w_in.size(0), F = w_out.size(2) * 8 / bits, F_in = (gated ? 2 : 1) * F;
  TORCH_CHECK(H > 0 && F > 0 && E > 0, kOp, ": H, F and E must be positive");
  TORCH_CHECK(bits == 8 || H % 2 == 0, kOp, ": 4-bit codes need an even H, got ", H);
  TORCH_CHECK(w_out.size(0) == E && w_out.size(1) == H, kOp, ": w_out codes must be [E=", E, ", H=", H,
              ", F·bits/8], got ", w_out.sizes());
  TORCH_CHECK(w_in.size(1) == F_in && w_in.size(2) == H * bits / 8, kOp, ": w_in codes must be [E, ",
              gated ? "2F" : "F", "=", F_in, ", H·bits/8=", H * bits / 8, "], got ", w_in.sizes());
  TORCH_CHECK(group_size >= 0 && block_rows >= 0, kOp, ": group_size and block_rows must be >= 0");
  if (fmt == kInt8 || fmt == kW8A8)
    TORCH_CHECK(group_size == 0, kOp, ": int8 weights have one scale per row (group_size 0), got ", group_size);
  if (four_bit(fmt))
    TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && H % group_size == 0 && F % group_size == 0, kOp,
                ": 4-bit formats need an even group_size dividing H=", H, " and F=", F, ", got ", group_size);
  if (fmt == kW8A8)
    TORCH_CHECK(H <= kW8A8MaxK && F <= kW8A8MaxK, kOp, ": w8a8 sums int8 products in int32: H and F must be <= ",
                kW8A8MaxK);
  check_bias(kOp, b_in, x, E, F_in, "b_in");
  check_bias(kOp, b_out, x, E, H, "b_out");
  const QMatrix in = make_matrix(w_in, w_in_scales, w_in_zeros, fmt, group_size, block_rows, E, F_in, H, F, "w_in");
  const QMatrix out = make_matrix(w_out, w_out_scales, w_out_zeros, fmt, group_size, block_rows, E, H, F, H, "w_out");
  const Routing rt = sort_by_expert(kOp, topk_ids, topk_weights, E);
  const int64_t isa = max_isa < 0 ? best_isa() : std::min(max_isa, best_isa());
  const Epilogue ep = make_epilogue(gated, activation, swiglu_alpha, swiglu_limit, weights_on_input, b_in, b_out);
  switch (x.scalar_type()) {
    case at::kBFloat16: return dispatch<bf16>(isa, x, in, out, F, rt, ep);
    case at::kHalf: return dispatch<half>(isa, x, in, out, F, rt, ep);
    default: return dispatch<float>(isa, x, in, out, F, rt, ep);
  }
}

}  // namespace
}  // namespace moecap

TORCH_LIBRARY_FRAGMENT(moecap, m) {
  m.def(
      "moe_experts_cpu_q(Tensor x, Tensor w_in, Tensor w_in_scales, Tensor? w_in_zeros, Tensor w_out, "
      "Tensor w_out_scales, Tensor? w_out_zeros, Tensor topk_ids, Tensor topk_weights, int fmt, "
      "int group_size, int block_rows, bool gated, int activation, int max_isa=-1, Tensor? b_in=None, "
      "Tensor? b_out=None, float swiglu_alpha=1.702, float swiglu_limit=7.0, bool weights_on_input=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(moecap, CPU, m) { m.impl("moe_experts_cpu_q", &moecap::moe_experts_cpu_q); }
