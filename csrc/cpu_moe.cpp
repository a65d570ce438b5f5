// moecap::moe_experts_cpu: fused routed-expert MLPs of one MoE layer on a CPU, built for decode,
// with dense (bfloat16, float16, float32) weights. The quantized op (cpu_moe_quant.cpp) shares its
// routing, blocking, phases and epilogue (cpu_moe_common.h); this file holds the dense row kernels.
//
// Why: at decode (a few tokens) a MoE layer is bound by reading each activated expert's weights.
// A torch loop over experts pays for small GEMV calls, separate gate/up/down passes and a thread
// fork/join per op: at decode the `loop` backend read weights at 0.26-0.51 of a streaming read of
// the same weights (benchmarks/results/compare-2026-11-29-amd-epyc.md). Here every activated
// weight byte is read once, by long contiguous runs on all cores (see cpu_moe_common.h).
//
// Schema:
//   moe_experts_cpu(Tensor x, Tensor w_in, Tensor w_out, Tensor topk_ids, Tensor topk_weights,
//                   bool gated, int activation, int max_isa=-1, Tensor? b_in=None, Tensor? b_out=None,
//                   float swiglu_alpha=1.702, float swiglu_limit=7.0, bool weights_on_input=False) -> Tensor
//   x [T, H]; w_in [E, F_in, H] with F_in = 2F when gated (gate rows, then up rows), else F;
//   w_out [E, H, F]; topk_ids int64 or int32 [T, k], every id in [0, E); topk_weights [T, k], any
//   floating dtype (used in fp32). x, w_in and w_out share one dtype: bfloat16, float16 or float32.
//   Accumulation is fp32; the result [T, H] has x's dtype. With bfloat16 the intermediate
//   act(gate) * up is rounded to bfloat16 before the down projection (as a torch bf16 MLP does);
//   float16 and float32 keep it in fp32.
//   activation: 0 silu, 1 gelu with erf (torch.nn.functional.gelu's default), 2 gelu tanh approx,
//   3 gpt-oss' clamped SwiGLU: (clamp(up, ±limit) + 1) · g · σ(alpha · g) with g = min(gate, limit).
//   b_in [E, F_in], b_out [E, H]: the experts' biases (x's dtype), added to the fp32 dot products.
//   weights_on_input: the routing weight scales the expert's input (Llama 4) instead of its output;
//   the up-phase dot products are linear in the input, so they are scaled before the bias and the
//   activation, and the down phase adds with weight 1.
//   max_isa caps the code path, for tests: -1 best available, 0 portable scalar, 1 AVX2+FMA,
//   2 AVX-512 (F/BW/VL), 3 AVX-512 BF16 (vdpbf16ps; bfloat16 only, else same as 2).
//   moe_experts_cpu_info() -> int[]: [best isa level of this CPU, 1 if built with OpenMP else 0].
//
// Build: no global -march flag; x86 kernels carry function-level target attributes and are chosen
// at run time with __builtin_cpu_supports. Threads need -fopenmp when compiling (linking needs no
// flag: the GOMP symbols resolve to the OpenMP runtime torch has loaded, so both share one thread
// pool); without it the op is correct but single-threaded.
#include <torch/library.h>

#include "cpu_moe_common.h"

namespace moecap {
namespace {

using namespace moecap::cpu;

// ---------------------------------------------------------------------------------------------
// Row kernels: out[r * N + n] = dot(w[r * K : r * K + K], x[n][0 : K]) for r < rows, n < N.
// The rows are contiguous and read one after the other, so each thread issues one sequential
// stream, the pattern hardware prefetchers follow best; every weight vector is loaded once
// and used for all N activation rows. U independent accumulators per (row, token) hide the
// FMA / dot-product latency. The K tail uses masked loads: no byte past a row is touched.
// ---------------------------------------------------------------------------------------------

// Portable kernel, also compiled for AVX2 below. 8 lanes per token keep the sums independent.
template <class W, int N>
__attribute__((always_inline)) inline void rows_portable(const W* w, int64_t rows, int64_t K,
                                                         const float* const* x, float* out) {
  constexpr int L = 8;
  for (int64_t r = 0; r < rows; ++r, w += K) {
    float acc[N][L] = {};
    int64_t k = 0;
    for (; k + L <= K; k += L) {
      float wv[L];
      for (int l = 0; l < L; ++l) wv[l] = to_float(w[k + l]);
      for (int n = 0; n < N; ++n)
        for (int l = 0; l < L; ++l) acc[n][l] += wv[l] * x[n][k + l];
    }
    for (; k < K; ++k)
      for (int n = 0; n < N; ++n) acc[n][0] += to_float(w[k]) * x[n][k];
    for (int n = 0; n < N; ++n) {
      float s = 0.f;
      for (int l = 0; l < L; ++l) s += acc[n][l];
      out[r * N + n] = s;
    }
  }
}

template <class W, int N>
__attribute__((noinline)) void rows_scalar(const W* w, int64_t rows, int64_t K, const float* const* x,
                                           float* out) {
  rows_portable<W, N>(w, rows, K, x, out);
}

#if MOECAP_X86
template <class W, int N>
MOECAP_TARGET_AVX2 __attribute__((noinline)) void rows_avx2(const W* w, int64_t rows, int64_t K,
                                                            const float* const* x, float* out) {
  rows_portable<W, N>(w, rows, K, x, out);
}

// 16 weights as fp32, full or masked (masked lanes read nothing and are zero).
MOECAP_TARGET_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
MOECAP_TARGET_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
MOECAP_TARGET_AVX512 inline __m512 load16(const half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
MOECAP_TARGET_AVX512 inline __m512 load16(const half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
MOECAP_TARGET_AVX512 inline __m512 bf16_bits_to_ps(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
MOECAP_TARGET_AVX512 inline __m512 load16(const bf16* p) {
  return bf16_bits_to_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
MOECAP_TARGET_AVX512 inline __m512 load16(const bf16* p, __mmask16 m) {
  return bf16_bits_to_ps(_mm256_maskz_loadu_epi16(m, p));
}

// AVX-512 kernel with fp32 activations: weights widened to fp32, 16 lanes per FMA.
template <class W, int N>
MOECAP_TARGET_AVX512 __attribute__((noinline)) void rows_avx512(const W* w, int64_t rows, int64_t K,
                                                                const float* const* x, float* out,
                                                                const void* limit) {
  constexpr int U = unroll<N>();
  const char* const end = static_cast<const char*>(limit);
  for (int64_t r = 0; r < rows; ++r, w += K) {
    __m512 acc[N][U];
    for (int n = 0; n < N; ++n)
      for (int u = 0; u < U; ++u) acc[n][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 * U <= K; k += 16 * U)
      for (int u = 0; u < U; ++u) {
        if ((u * 16 * sizeof(W)) % 64 == 0) prefetch_ahead(w + k + 16 * u, end);
        const __m512 wv = load16(w + k + 16 * u);
        for (int n = 0; n < N; ++n) acc[n][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x[n] + k + 16 * u), acc[n][u]);
      }
    for (; k + 16 <= K; k += 16) {
      const __m512 wv = load16(w + k);
      for (int n = 0; n < N; ++n) acc[n][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x[n] + k), acc[n][0]);
    }
    if (k < K) {
      const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1u);
      const __m512 wv = load16(w + k, m);
      for (int n = 0; n < N; ++n) acc[n][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x[n] + k), acc[n][0]);
    }
    for (int n = 0; n < N; ++n) {
      for (int u = 1; u < U; ++u) acc[n][0] = _mm512_add_ps(acc[n][0], acc[n][u]);
      out[r * N + n] = _mm512_reduce_add_ps(acc[n][0]);
    }
  }
}

MOECAP_TARGET_BF16 inline __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// AVX-512 BF16 kernel: bf16 weights and activations; vdpbf16ps multiplies 32 pairs exactly and
// accumulates in fp32.
template <int N>
MOECAP_TARGET_BF16 inline void row_bf16(const bf16* w, int64_t K, const bf16* const* x, float* out,
                                        const char* end) {
  constexpr int U = unroll<N>();
  __m512 acc[N][U];
  for (int n = 0; n < N; ++n)
    for (int u = 0; u < U; ++u) acc[n][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U)
    for (int u = 0; u < U; ++u) {
      prefetch_ahead(w + k + 32 * u, end);
      const __m512i wv = _mm512_loadu_si512(w + k + 32 * u);
      for (int n = 0; n < N; ++n) acc[n][u] = dot_bf16(acc[n][u], wv, _mm512_loadu_si512(x[n] + k + 32 * u));
    }
  for (; k + 32 <= K; k += 32) {
    const __m512i wv = _mm512_loadu_si512(w + k);
    for (int n = 0; n < N; ++n) acc[n][0] = dot_bf16(acc[n][0], wv, _mm512_loadu_si512(x[n] + k));
  }
  if (k < K) {
    const __mmask32 m = static_cast<__mmask32>((1ull << (K - k)) - 1ull);
    const __m512i wv = _mm512_maskz_loadu_epi16(m, w + k);
    for (int n = 0; n < N; ++n) acc[n][0] = dot_bf16(acc[n][0], wv, _mm512_maskz_loadu_epi16(m, x[n] + k));
  }
  for (int n = 0; n < N; ++n) {
    for (int u = 1; u < U; ++u) acc[n][0] = _mm512_add_ps(acc[n][0], acc[n][u]);
    out[n] = _mm512_reduce_add_ps(acc[n][0]);
  }
}

template <int N>
MOECAP_TARGET_BF16 __attribute__((noinline)) void rows_bf16(const bf16* w, int64_t rows, int64_t K,
                                                            const bf16* const* x, float* out, const void* limit) {
  const char* const end = static_cast<const char*>(limit);
  for (int64_t r = 0; r < rows; ++r) row_bf16<N>(w + r * K, K, x, out + r * N, end);
}
#endif  // MOECAP_X86

// The dense family: W is the weight (and x, output) dtype, A the dtype the kernels read
// activations in, I the instruction set. Activation rows are plain (no padding, no permutation).
template <class WT, class AT, Isa I>
struct DenseKernel {
  using T = WT;
  using A = AT;
  struct Matrix {
    const WT* w;  // [E, rows, cols]
    int64_t rows, cols;
  };
  static int64_t row_elems(int64_t cols) { return cols; }
  static void prepare_row(const float* v, int64_t cols, A* row) {
    for (int64_t k = 0; k < cols; ++k) row[k] = static_cast<A>(v[k]);
  }
  static int64_t row_bytes(const Matrix& m) { return m.cols * static_cast<int64_t>(sizeof(WT)); }
  template <int N>
  static void rows(const Matrix& m, int64_t e, int64_t r0, int64_t n_rows, int64_t r_end, const A* const* x,
                   float* out) {
    const WT* w = m.w + (e * m.rows + r0) * m.cols;
    const WT* limit = m.w + (e * m.rows + r_end) * m.cols;
    const int64_t K = m.cols;
#if MOECAP_X86
    if constexpr (I == kAvx512Bf16) {
      rows_bf16<N>(w, n_rows, K, x, out, limit);
    } else if constexpr (I == kAvx512) {
      rows_avx512<WT, N>(w, n_rows, K, x, out, limit);
    } else if constexpr (I == kAvx2) {
      rows_avx2<WT, N>(w, n_rows, K, x, out);
    } else {
      rows_scalar<WT, N>(w, n_rows, K, x, out);
    }
#else
    rows_scalar<WT, N>(w, n_rows, K, x, out);
    (void)limit;
#endif
  }
};

// ---------------------------------------------------------------------------------------------
// Op entry: checks, routing, ISA dispatch.
// ---------------------------------------------------------------------------------------------

constexpr const char* kOp = "moe_experts_cpu";

void check_weights(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_out, bool gated) {
  check_cpu_contiguous(w_in, kOp, "w_in");
  check_cpu_contiguous(w_out, kOp, "w_out");
  TORCH_CHECK(w_in.dim() == 3, kOp, ": w_in must be 3-D [E, F_in, H], got ", w_in.sizes());
  TORCH_CHECK(w_out.dim() == 3, kOp, ": w_out must be 3-D [E, H, F], got ", w_out.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(w_in.scalar_type() == dtype && w_out.scalar_type() == dtype, kOp,
              ": x, w_in and w_out must share one dtype, got ", dtype, ", ", w_in.scalar_type(), ", ",
              w_out.scalar_type());
  const int64_t H = x.size(1), E = w_in.size(0), F = w_out.size(2);
  TORCH_CHECK(H > 0 && F > 0 && E > 0, kOp, ": H, F and E must be positive");
  TORCH_CHECK(w_out.size(0) == E && w_out.size(1) == H, kOp, ": w_out must be [E=", E, ", H=", H, ", F], got ",
              w_out.sizes());
  TORCH_CHECK(w_in.size(1) == (gated ? 2 : 1) * F && w_in.size(2) == H, kOp, ": w_in must be [E, ",
              gated ? "2F" : "F", "=", (gated ? 2 : 1) * F, ", H=", H, "], got ", w_in.sizes());
}

template <class K>
at::Tensor run_dense(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_out, const Routing& rt,
                     const Epilogue& ep) {
  using W = typename K::T;
  const typename K::Matrix in{w_in.data_ptr<W>(), w_in.size(1), w_in.size(2)};
  const typename K::Matrix out{w_out.data_ptr<W>(), w_out.size(1), w_out.size(2)};
  return run_experts<K>(x, in, out, w_out.size(2), rt, ep);
}

template <class W>
at::Tensor dispatch_float_act(int64_t isa, const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_out,
                              const Routing& rt, const Epilogue& ep) {
  if (isa >= kAvx512) return run_dense<DenseKernel<W, float, kAvx512>>(x, w_in, w_out, rt, ep);
  if (isa == kAvx2) return run_dense<DenseKernel<W, float, kAvx2>>(x, w_in, w_out, rt, ep);
  return run_dense<DenseKernel<W, float, kScalar>>(x, w_in, w_out, rt, ep);
}

at::Tensor moe_experts_cpu(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_out,
                           const at::Tensor& topk_ids, const at::Tensor& topk_weights, bool gated,
                           int64_t activation, int64_t max_isa, const std::optional<at::Tensor>& b_in,
                           const std::optional<at::Tensor>& b_out, double swiglu_alpha, double swiglu_limit,
                           bool weights_on_input) {
  check_x_and_routing(kOp, x, topk_ids, topk_weights, gated, activation);
  check_weights(x, w_in, w_out, gated);
  check_bias(kOp, b_in, x, w_in.size(0), w_in.size(1), "b_in");
  check_bias(kOp, b_out, x, w_in.size(0), x.size(1), "b_out");
  const Routing rt = sort_by_expert(kOp, topk_ids, topk_weights, w_in.size(0));
  const int64_t isa = max_isa < 0 ? best_isa() : std::min(max_isa, best_isa());
  const Epilogue ep = make_epilogue(gated, activation, swiglu_alpha, swiglu_limit, weights_on_input, b_in, b_out);
  switch (x.scalar_type()) {
    case at::kBFloat16:
#if MOECAP_X86
      if (isa == kAvx512Bf16) return run_dense<DenseKernel<bf16, bf16, kAvx512Bf16>>(x, w_in, w_out, rt, ep);
#endif
      return dispatch_float_act<bf16>(isa, x, w_in, w_out, rt, ep);
    case at::kHalf:
      return dispatch_float_act<half>(isa, x, w_in, w_out, rt, ep);
    default:
      return dispatch_float_act<float>(isa, x, w_in, w_out, rt, ep);
  }
}

std::vector<int64_t> moe_experts_cpu_info() {
#ifdef _OPENMP
  const int64_t threaded = 1;
#else
  const int64_t threaded = 0;
#endif
  return {best_isa(), threaded};
}

}  // namespace
}  // namespace moecap

TORCH_LIBRARY_FRAGMENT(moecap, m) {
  m.def(
      "moe_experts_cpu(Tensor x, Tensor w_in, Tensor w_out, Tensor topk_ids, Tensor topk_weights, "
      "bool gated, int activation, int max_isa=-1, Tensor? b_in=None, Tensor? b_out=None, "
      "float swiglu_alpha=1.702, float swiglu_limit=7.0, bool weights_on_input=False) -> Tensor");
  m.def("moe_experts_cpu_info() -> int[]", &moecap::moe_experts_cpu_info);
}

TORCH_LIBRARY_IMPL(moecap, CPU, m) { m.impl("moe_experts_cpu", &moecap::moe_experts_cpu); }
