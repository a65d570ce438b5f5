// moecap::moe_experts_cpu: fused routed-expert MLPs of one MoE layer on a CPU, built for decode.
//
// Why: at decode (a few tokens) a MoE layer is bound by reading each activated expert's weights.
// A torch loop over experts pays for small GEMV calls, separate gate/up/down passes and a thread
// fork/join per op: at decode the `loop` backend read weights at 0.26-0.51 of a streaming read of
// the same weights (benchmarks/results/compare-2026-11-29-amd-epyc.md). Here the routed pairs are
// sorted by expert once, then one OpenMP region runs two phases split by one barrier:
//   up:   work units are ranges of intermediate rows [f0, f1); a unit streams those gate and up
//         rows of every activated expert once, dotting each row against ALL routed rows of that
//         expert (4 at a time, held in L1), and stores act(gate) * up per routed pair;
//   down: work units are ranges of output rows [h0, h1); a unit streams those rows of every
//         activated expert's down matrix once, sums weight * dot per token in fp32 and writes its
//         output columns, which no other unit touches.
// Threads take units from a shared counter (about 4 per thread and phase), so every activated
// weight byte is read exactly once, each thread reads long contiguous runs, and a thread slowed
// down by another process does not hold the others up.
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
// pool); without it the op is correct but single-threaded. Only light headers: this file is JIT-compiled on first use.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define MOECAP_X86 1
#include <immintrin.h>
#define MOECAP_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define MOECAP_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define MOECAP_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define MOECAP_X86 0
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace moecap {
namespace {

using bf16 = c10::BFloat16;
using half = c10::Half;

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
enum Activation : int64_t { kSilu = 0, kGeluErf = 1, kGeluTanh = 2, kSwigluOai = 3 };

constexpr int kTokens = 4;  // routed rows per register tile (an expert with more: further passes)

// ---------------------------------------------------------------------------------------------
// Row kernels: out[r * N + n] = dot(w[r * K : r * K + K], x[n][0 : K]) for r < rows, n < N.
// The rows are contiguous and read one after the other, so each thread issues one sequential
// stream, the pattern hardware prefetchers follow best; every weight vector is loaded once
// and used for all N activation rows. U independent accumulators per (row, token) hide the
// FMA / dot-product latency. The K tail uses masked loads: no byte past a row is touched.
// ---------------------------------------------------------------------------------------------

inline float to_float(float v) { return v; }
inline float to_float(half v) { return static_cast<float>(v); }
inline float to_float(bf16 v) { return static_cast<float>(v); }

template <int N>
constexpr int unroll() {
  return N <= 2 ? 4 : 2;
}

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

// Software prefetch of the weight line kPrefetchBytes ahead, within the block being read: the
// hardware prefetchers stop at 4 KiB pages, and with several activation rows the dot products
// keep the core too busy to wait for them.
constexpr int64_t kPrefetchBytes = 4096;
MOECAP_TARGET_AVX512 inline void prefetch_ahead(const void* p, const char* end) {
  const char* ahead = static_cast<const char*>(p) + kPrefetchBytes;
  if (ahead < end) _mm_prefetch(ahead, _MM_HINT_T0);
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

// A kernel family: W is the weight (and x, output) dtype, A the dtype the kernels read
// activations in, I the instruction set.
template <class WT, class AT, Isa I>
struct Kernel {
  using W = WT;
  using A = AT;
  // `limit` ends the contiguous weight run these rows belong to: prefetches stay below it.
  template <int N>
  static void run(const W* w, int64_t rows, int64_t K, const A* const* x, float* out, const W* limit) {
#if MOECAP_X86
    if constexpr (I == kAvx512Bf16) {
      rows_bf16<N>(w, rows, K, x, out, limit);
    } else if constexpr (I == kAvx512) {
      rows_avx512<W, N>(w, rows, K, x, out, limit);
    } else if constexpr (I == kAvx2) {
      rows_avx2<W, N>(w, rows, K, x, out);
    } else {
      rows_scalar<W, N>(w, rows, K, x, out);
    }
#else
    rows_scalar<W, N>(w, rows, K, x, out);
    (void)limit;
#endif
  }
  // The N = n (1..kTokens) instantiation.
  static void run_n(int n, const W* w, int64_t rows, int64_t K, const A* const* x, float* out, const W* limit) {
    switch (n) {
      case 1: run<1>(w, rows, K, x, out, limit); break;
      case 2: run<2>(w, rows, K, x, out, limit); break;
      case 3: run<3>(w, rows, K, x, out, limit); break;
      default: run<4>(w, rows, K, x, out, limit); break;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Routing and the two phases. Work units are row ranges (of F in the up phase, of H in the down
// phase) covering every activated expert, so a unit of the down phase owns its output columns
// outright: no two threads ever add into the same output entries.
// ---------------------------------------------------------------------------------------------

// Routed pairs grouped by expert: the slots of activated expert i are [start[i], start[i + 1]).
struct Routing {
  std::vector<int64_t> expert;  // activated experts, ascending
  std::vector<int64_t> start;
  std::vector<int64_t> token;   // token of each slot
  std::vector<float> weight;    // combine weight of each slot
};

// How one phase splits a matrix's rows. A work unit is `unit` rows: long, so each thread streams
// long contiguous runs, yet several per thread, so a thread slowed by another process is covered
// by the others. Units are read in passes of `pass` rows (~kPassBytes) that stay in L2 while further
// 4-token chunks of the same expert reuse them.
struct Blocking {
  int64_t unit, pass;
};

constexpr int64_t kUnitsPerThread = 4;
constexpr int64_t kPassBytes = 65536;

Blocking blocking(int64_t rows, int64_t row_bytes, int64_t threads) {
  const int64_t pass = std::max<int64_t>(1, kPassBytes / std::max<int64_t>(1, row_bytes));
  const int64_t share = (rows + threads * kUnitsPerThread - 1) / (threads * kUnitsPerThread);
  return {std::max<int64_t>(pass, (share + pass - 1) / pass * pass), pass};
}

template <class W, class A>
struct Problem {
  const W* w_in;
  const W* w_out;
  const A* x;  // [T, H] in the kernels' activation dtype
  A* act;      // [slots, F] act(gate) * up, one row per slot
  W* out;      // [T, H] result
  int64_t T, H, F;
  bool gated;
  int64_t activation;
  float alpha, limit;     // kSwigluOai's
  bool weights_on_input;  // the routing weight scales the input (the up phase), not the output
  const W* b_in;          // [E, F_in] or nullptr
  const W* b_out;         // [E, H] or nullptr
  const Routing* routing;
  Blocking up, down;  // over the F rows of w_in (gate and up alike) and the H rows of w_out
};

inline float apply_activation(float v, int64_t activation) {  // the ungated ones
  switch (activation) {
    case kSilu: return v / (1.f + std::exp(-v));
    case kGeluErf: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    default: {
      const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.f + std::tanh(inner));
    }
  }
}

// act(gate) * up (or act(gate) alone when not gated) for one intermediate value, in fp32.
template <class W, class A>
inline float glu(float gate, float up, const Problem<W, A>& p) {
  if (p.activation == kSwigluOai) {
    const float g = std::min(gate, p.limit), u = std::max(-p.limit, std::min(up, p.limit));
    return (u + 1.f) * g / (1.f + std::exp(-p.alpha * g));
  }
  const float a = apply_activation(gate, p.activation);
  return p.gated ? a * up : a;
}

// Up-phase unit: intermediate rows [f0, f0 + unit) of every activated expert.
template <class K>
void up_unit(const Problem<typename K::W, typename K::A>& p, int64_t f0, float* gate, float* up) {
  using A = typename K::A;
  const Routing& rt = *p.routing;
  const int64_t H = p.H, F = p.F, f1 = std::min(F, f0 + p.up.unit);
  const A* xrow[kTokens];
  for (size_t i = 0; i < rt.expert.size(); ++i) {
    const int64_t f_in = p.gated ? 2 * F : F;
    const auto* w = p.w_in + rt.expert[i] * f_in * H;
    const auto* bias = p.b_in ? p.b_in + rt.expert[i] * f_in : nullptr;
    for (int64_t f = f0; f < f1; f += p.up.pass) {
      const int64_t nb = std::min(p.up.pass, f1 - f);
      for (int64_t c = rt.start[i]; c < rt.start[i + 1]; c += kTokens) {
        const int n = static_cast<int>(std::min<int64_t>(kTokens, rt.start[i + 1] - c));
        for (int t = 0; t < n; ++t) xrow[t] = p.x + rt.token[c + t] * H;
        K::run_n(n, w + f * H, nb, H, xrow, gate, w + f1 * H);
        if (p.gated) K::run_n(n, w + (F + f) * H, nb, H, xrow, up, w + (F + f1) * H);
        for (int t = 0; t < n; ++t) {
          A* dst = p.act + (c + t) * F + f;
          const float scale = p.weights_on_input ? rt.weight[c + t] : 1.f;
          for (int64_t j = 0; j < nb; ++j) {
            float g = gate[j * n + t] * scale, u = p.gated ? up[j * n + t] * scale : 0.f;
            if (bias) {
              g += to_float(bias[f + j]);
              if (p.gated) u += to_float(bias[F + f + j]);
            }
            dst[j] = static_cast<A>(glu(g, u, p));
          }
        }
      }
    }
  }
}

// Down-phase unit: output columns [h0, h0 + unit) summed over every activated expert, then stored.
template <class K>
void down_unit(const Problem<typename K::W, typename K::A>& p, int64_t h0, float* dots, float* acc) {
  using W = typename K::W;
  using A = typename K::A;
  const Routing& rt = *p.routing;
  const int64_t H = p.H, F = p.F, h1 = std::min(H, h0 + p.down.unit), width = h1 - h0;
  std::fill(acc, acc + p.T * width, 0.f);
  const A* xrow[kTokens];
  for (size_t i = 0; i < rt.expert.size(); ++i) {
    const W* w = p.w_out + rt.expert[i] * H * F;
    const W* bias = p.b_out ? p.b_out + rt.expert[i] * H : nullptr;
    for (int64_t h = h0; h < h1; h += p.down.pass) {
      const int64_t nb = std::min(p.down.pass, h1 - h);
      for (int64_t c = rt.start[i]; c < rt.start[i + 1]; c += kTokens) {
        const int n = static_cast<int>(std::min<int64_t>(kTokens, rt.start[i + 1] - c));
        for (int t = 0; t < n; ++t) xrow[t] = p.act + (c + t) * F;
        K::run_n(n, w + h * F, nb, F, xrow, dots, w + h1 * F);
        for (int t = 0; t < n; ++t) {
          float* dst = acc + rt.token[c + t] * width + (h - h0);
          const float wt = p.weights_on_input ? 1.f : rt.weight[c + t];
          if (bias) {
            for (int64_t j = 0; j < nb; ++j) dst[j] += wt * (dots[j * n + t] + to_float(bias[h + j]));
          } else {
            for (int64_t j = 0; j < nb; ++j) dst[j] += wt * dots[j * n + t];
          }
        }
      }
    }
  }
  for (int64_t t = 0; t < p.T; ++t)
    for (int64_t j = 0; j < width; ++j) p.out[t * H + h0 + j] = static_cast<W>(acc[t * width + j]);
}

// One thread's share of both phases; `barrier` separates them (act must be complete).
template <class K, class Barrier>
void worker(const Problem<typename K::W, typename K::A>& p, std::atomic<int64_t>* next, Barrier barrier) {
  std::vector<float> gate(static_cast<size_t>(p.up.pass * kTokens)), up(gate.size());
  const int64_t up_units = (p.F + p.up.unit - 1) / p.up.unit;
  for (int64_t u = next[0].fetch_add(1); u < up_units; u = next[0].fetch_add(1))
    up_unit<K>(p, u * p.up.unit, gate.data(), up.data());
  barrier();
  std::vector<float> dots(static_cast<size_t>(p.down.pass * kTokens));
  std::vector<float> acc(static_cast<size_t>(p.down.unit * p.T));
  const int64_t down_units = (p.H + p.down.unit - 1) / p.down.unit;
  for (int64_t u = next[1].fetch_add(1); u < down_units; u = next[1].fetch_add(1))
    down_unit<K>(p, u * p.down.unit, dots.data(), acc.data());
}

// Both phases on every thread of one OpenMP team (one thread without OpenMP or when nested).
template <class K>
void run_phases(const Problem<typename K::W, typename K::A>& p) {
  std::atomic<int64_t> next[2];
  next[0] = 0;
  next[1] = 0;
#ifdef _OPENMP
  at::internal::lazy_init_num_threads();
  if (at::get_num_threads() > 1 && !omp_in_parallel()) {
#pragma omp parallel
    worker<K>(p, next, [] {
#pragma omp barrier
    });
    return;
  }
#endif
  worker<K>(p, next, [] {});
}

// What surrounds an expert's two GEMMs: its activation, its biases, where its routing weight goes.
struct Epilogue {
  bool gated;
  int64_t activation;
  float alpha, limit;
  bool weights_on_input;
  const at::Tensor* b_in;   // or nullptr
  const at::Tensor* b_out;  // or nullptr
};

template <class K>
at::Tensor run_experts(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_out, const Routing& rt,
                       const Epilogue& ep) {
  using W = typename K::W;
  using A = typename K::A;
  const int64_t T = x.size(0), H = x.size(1), F = w_out.size(2);
  const int64_t slots = static_cast<int64_t>(rt.token.size());
  const W* xw = x.data_ptr<W>();
  std::vector<A> x_conv;  // x in the activation dtype when that differs from W
  const A* xa = nullptr;
  if constexpr (std::is_same_v<A, W>) {
    xa = xw;
  } else {
    x_conv.resize(static_cast<size_t>(T * H));
    for (int64_t i = 0; i < T * H; ++i) x_conv[i] = static_cast<A>(to_float(xw[i]));
    xa = x_conv.data();
  }
  std::vector<A> act(static_cast<size_t>(std::max<int64_t>(slots * F, 1)));
  at::Tensor out = at::empty({T, H}, x.options());
  const int64_t elem = static_cast<int64_t>(sizeof(W)), threads = std::max(1, at::get_num_threads());
  const Problem<W, A> p{w_in.data_ptr<W>(),
                        w_out.data_ptr<W>(),
                        xa,
                        act.data(),
                        out.data_ptr<W>(),
                        T,
                        H,
                        F,
                        ep.gated,
                        ep.activation,
                        ep.alpha,
                        ep.limit,
                        ep.weights_on_input,
                        ep.b_in ? ep.b_in->data_ptr<W>() : nullptr,
                        ep.b_out ? ep.b_out->data_ptr<W>() : nullptr,
                        &rt,
                        blocking(F, H * elem, threads),
                        blocking(H, F * elem, threads)};
  run_phases<K>(p);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Op entry: checks, routing, ISA dispatch.
// ---------------------------------------------------------------------------------------------

int64_t best_isa() {
#if MOECAP_X86
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  if (avx512) return __builtin_cpu_supports("avx512bf16") ? kAvx512Bf16 : kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

void check_args(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_out, const at::Tensor& ids,
                const at::Tensor& weights, bool gated, int64_t activation) {
  const char* op = "moe_experts_cpu";
  for (const at::Tensor* t : {&x, &w_in, &w_out, &ids, &weights}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": all tensors must be on the CPU, got one on ", t->device());
    TORCH_CHECK(t->is_contiguous(), op, ": all tensors must be contiguous");
  }
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [T, H], got ", x.sizes());
  TORCH_CHECK(w_in.dim() == 3, op, ": w_in must be 3-D [E, F_in, H], got ", w_in.sizes());
  TORCH_CHECK(w_out.dim() == 3, op, ": w_out must be 3-D [E, H, F], got ", w_out.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat, op,
              ": x must be bfloat16, float16 or float32, got ", dtype);
  TORCH_CHECK(w_in.scalar_type() == dtype && w_out.scalar_type() == dtype, op,
              ": x, w_in and w_out must share one dtype, got ", dtype, ", ", w_in.scalar_type(), ", ",
              w_out.scalar_type());
  const int64_t H = x.size(1), E = w_in.size(0), F = w_out.size(2);
  TORCH_CHECK(H > 0 && F > 0 && E > 0, op, ": H, F and E must be positive");
  TORCH_CHECK(w_out.size(0) == E && w_out.size(1) == H, op, ": w_out must be [E=", E, ", H=", H, ", F], got ",
              w_out.sizes());
  TORCH_CHECK(w_in.size(1) == (gated ? 2 : 1) * F && w_in.size(2) == H, op, ": w_in must be [E, ",
              gated ? "2F" : "F", "=", (gated ? 2 : 1) * F, ", H=", H, "], got ", w_in.sizes());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0), op, ": topk_ids must be [T=", x.size(0), ", k], got ",
              ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
              ": topk_ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK(weights.sizes() == ids.sizes(), op, ": topk_weights must match topk_ids ", ids.sizes(), ", got ",
              weights.sizes());
  TORCH_CHECK(at::isFloatingType(weights.scalar_type()), op, ": topk_weights must be floating, got ",
              weights.scalar_type());
  TORCH_CHECK(activation >= kSilu && activation <= kSwigluOai, op,
              ": activation must be 0 (silu), 1 (gelu erf), 2 (gelu tanh) or 3 (clamped SwiGLU), got ", activation);
  TORCH_CHECK(activation != kSwigluOai || gated, op, ": the clamped SwiGLU needs gated experts");
}

void check_bias(const std::optional<at::Tensor>& b, const at::Tensor& x, int64_t E, int64_t n, const char* name) {
  if (!b.has_value()) return;
  TORCH_CHECK(b->device().is_cpu() && b->is_contiguous(), "moe_experts_cpu: ", name, " must be a contiguous CPU tensor");
  TORCH_CHECK(b->scalar_type() == x.scalar_type(), "moe_experts_cpu: ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", b->scalar_type());
  TORCH_CHECK(b->dim() == 2 && b->size(0) == E && b->size(1) == n, "moe_experts_cpu: ", name, " must be [E=", E,
              ", ", n, "], got ", b->sizes());
}

template <class I>
std::vector<int64_t> read_ids(const at::Tensor& ids) {
  const I* p = ids.data_ptr<I>();
  return std::vector<int64_t>(p, p + ids.numel());
}

template <class V>
std::vector<float> read_weights(const at::Tensor& w) {
  const V* p = w.data_ptr<V>();
  std::vector<float> out(static_cast<size_t>(w.numel()));
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(p[i]);
  return out;
}

// Counting sort of the routed pairs by expert; rejects ids outside [0, E).
Routing sort_by_expert(const at::Tensor& ids_t, const at::Tensor& weights_t, int64_t E) {
  const std::vector<int64_t> ids = ids_t.scalar_type() == at::kLong ? read_ids<int64_t>(ids_t) : read_ids<int32_t>(ids_t);
  std::vector<float> wts;
  switch (weights_t.scalar_type()) {
    case at::kFloat: wts = read_weights<float>(weights_t); break;
    case at::kDouble: wts = read_weights<double>(weights_t); break;
    case at::kHalf: wts = read_weights<half>(weights_t); break;
    case at::kBFloat16: wts = read_weights<bf16>(weights_t); break;
    default: TORCH_CHECK(false, "moe_experts_cpu: unsupported topk_weights dtype ", weights_t.scalar_type());
  }
  const int64_t k = ids_t.size(1);
  std::vector<int64_t> count(static_cast<size_t>(E) + 1, 0);
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t e = ids[i];
    TORCH_CHECK(e >= 0 && e < E, "moe_experts_cpu: expert id ", e, " at topk_ids[", static_cast<int64_t>(i) / k,
                ", ", static_cast<int64_t>(i) % k, "] is outside [0, ", E, ")");
    ++count[e + 1];
  }
  Routing rt;
  std::vector<int64_t> next(static_cast<size_t>(E), 0);
  for (int64_t e = 0; e < E; ++e) {
    next[e] = count[e];
    count[e + 1] += count[e];
    if (count[e + 1] > count[e]) {
      rt.expert.push_back(e);
      rt.start.push_back(count[e]);
    }
  }
  rt.start.push_back(count[E]);
  rt.token.resize(ids.size());
  rt.weight.resize(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t slot = next[ids[i]]++;
    rt.token[slot] = static_cast<int64_t>(i) / k;
    rt.weight[slot] = wts[i];
  }
  return rt;
}

template <class W>
at::Tensor dispatch_float_act(int64_t isa, const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_out,
                              const Routing& rt, const Epilogue& ep) {
  if (isa >= kAvx512) return run_experts<Kernel<W, float, kAvx512>>(x, w_in, w_out, rt, ep);
  if (isa == kAvx2) return run_experts<Kernel<W, float, kAvx2>>(x, w_in, w_out, rt, ep);
  return run_experts<Kernel<W, float, kScalar>>(x, w_in, w_out, rt, ep);
}

at::Tensor moe_experts_cpu(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_out,
                           const at::Tensor& topk_ids, const at::Tensor& topk_weights, bool gated,
                           int64_t activation, int64_t max_isa, const std::optional<at::Tensor>& b_in,
                           const std::optional<at::Tensor>& b_out, double swiglu_alpha, double swiglu_limit,
                           bool weights_on_input) {
  check_args(x, w_in, w_out, topk_ids, topk_weights, gated, activation);
  check_bias(b_in, x, w_in.size(0), w_in.size(1), "b_in");
  check_bias(b_out, x, w_in.size(0), x.size(1), "b_out");
  const Routing rt = sort_by_expert(topk_ids, topk_weights, w_in.size(0));
  const int64_t isa = max_isa < 0 ? best_isa() : std::min(max_isa, best_isa());
  const Epilogue ep{gated,
                    activation,
                    static_cast<float>(swiglu_alpha),
                    static_cast<float>(swiglu_limit),
                    weights_on_input,
                    b_in.has_value() ? &*b_in : nullptr,
                    b_out.has_value() ? &*b_out : nullptr};
  switch (x.scalar_type()) {
    case at::kBFloat16:
#if MOECAP_X86
      if (isa == kAvx512Bf16) return run_experts<Kernel<bf16, bf16, kAvx512Bf16>>(x, w_in, w_out, rt, ep);
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
