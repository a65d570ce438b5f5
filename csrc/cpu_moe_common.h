// What the CPU MoE expert ops share (moecap::moe_experts_cpu in cpu_moe.cpp, dense weights, and
// moecap::moe_experts_cpu_q in cpu_moe_quant.cpp, quantized weights): the routing, the blocking,
// the phases and the epilogue. Only the row kernels differ; each op supplies them as a kernel
// family K (see "Kernel families" below), and run_experts<K> does everything else.
//
// The phases. Routed pairs are sorted by expert once, then one OpenMP region runs, split by barriers:
//   x:    each token's row x[t] is put into the layout K's row kernels read (a dtype conversion, a
//         permutation of each block of K, or int8 codes with their scale);
//   up:   work units are ranges of intermediate rows [f0, f1); a unit streams those gate and up
//         rows of every activated expert once, dotting each row against ALL routed rows of that
//         expert (kTokens at a time, held in L1), and stores act(gate) * up per routed pair (fp32);
//   act:  each pair's act(gate) * up row is put into K's layout, as x was;
//   down: work units are ranges of output rows [h0, h1); a unit streams those rows of every
//         activated expert's down matrix once, sums weight * dot per token in fp32 and writes its
//         output columns, which no other unit touches.
// Threads take units from shared counters (about 4 per thread and phase), so every activated
// weight byte is read exactly once, each thread reads long contiguous runs, and a thread slowed
// down by another process does not hold the others up.
//
// Only light headers: the files including this one are JIT-compiled on first use.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

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
namespace cpu {

using bf16 = c10::BFloat16;
using half = c10::Half;

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
enum Activation : int64_t { kSilu = 0, kGeluErf = 1, kGeluTanh = 2, kSwigluOai = 3 };

constexpr int kTokens = 4;  // routed rows per register tile (an expert with more: further passes)

inline float to_float(float v) { return v; }
inline float to_float(half v) { return static_cast<float>(v); }
inline float to_float(bf16 v) { return static_cast<float>(v); }

// Independent accumulators per (row, token) that hide the FMA / dot-product latency.
template <int N>
constexpr int unroll() {
  return N <= 2 ? 4 : 2;
}

constexpr int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The best code path this CPU runs (the ops cap it with max_isa).
inline int64_t best_isa() {
#if MOECAP_X86
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  if (avx512) return __builtin_cpu_supports("avx512bf16") ? kAvx512Bf16 : kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

#if MOECAP_X86
// Software prefetch of the weight line kPrefetchBytes ahead, within the run being read: the
// hardware prefetchers stop at 4 KiB pages, and with several activation rows the dot products
// keep the core too busy to wait for them.
constexpr int64_t kPrefetchBytes = 4096;
MOECAP_TARGET_AVX512 inline void prefetch_ahead(const void* p, const char* end) {
  const char* ahead = static_cast<const char*>(p) + kPrefetchBytes;
  if (ahead < end) _mm_prefetch(ahead, _MM_HINT_T0);
}
#endif

// ---------------------------------------------------------------------------------------------
// Kernel families. A family K supplies:
//   using T;       the dtype of x, the biases and the output (bf16, half or float)
//   using A;       the element of the activation rows its row kernels read
//   struct Matrix; one weight matrix of every expert, [E, R, cols], cheap to copy, with `cols`
//   static int64_t row_elems(int64_t cols);   elements of one activation row of length cols
//   static void prepare_row(const float* v, int64_t cols, A* row);   such a row from fp32 values
//   static int64_t row_bytes(const Matrix&);  weight bytes per matrix row (for the blocking)
//   template <int N> static void rows(const Matrix& m, int64_t e, int64_t r0, int64_t n_rows,
//                                     int64_t r_end, const A* const* x, float* out);
//     out[r * N + n] = Σ_k W_e[r0 + r, k] · x_n[k] for r < n_rows, every scale applied; the rows
//     [r0, r_end) are one contiguous run, which bounds the prefetches.
// ---------------------------------------------------------------------------------------------

// The N = n (1..kTokens) instantiation of K::rows.
template <class K>
void run_n(int n, const typename K::Matrix& m, int64_t e, int64_t r0, int64_t rows, int64_t r_end,
           const typename K::A* const* x, float* out) {
  switch (n) {
    case 1: K::template rows<1>(m, e, r0, rows, r_end, x, out); break;
    case 2: K::template rows<2>(m, e, r0, rows, r_end, x, out); break;
    case 3: K::template rows<3>(m, e, r0, rows, r_end, x, out); break;
    default: K::template rows<4>(m, e, r0, rows, r_end, x, out); break;
  }
}

// ---------------------------------------------------------------------------------------------
// Routing and the phases. Work units are row ranges (of F in the up phase, of H in the down
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
// kTokens-row chunks of the same expert reuse them.
struct Blocking {
  int64_t unit, pass;
};

constexpr int64_t kUnitsPerThread = 4;
constexpr int64_t kPassBytes = 65536;

inline Blocking blocking(int64_t rows, int64_t row_bytes, int64_t threads) {
  const int64_t pass = std::max<int64_t>(1, kPassBytes / std::max<int64_t>(1, row_bytes));
  const int64_t share = (rows + threads * kUnitsPerThread - 1) / (threads * kUnitsPerThread);
  return {std::max<int64_t>(pass, (share + pass - 1) / pass * pass), pass};
}

// What surrounds an expert's two GEMMs: its activation, its biases, where its routing weight goes.
struct Epilogue {
  bool gated;
  int64_t activation;
  float alpha, limit;       // kSwigluOai's
  bool weights_on_input;    // the routing weight scales the input (the up phase), not the output
  const at::Tensor* b_in;   // [E, F_in] or nullptr
  const at::Tensor* b_out;  // [E, H] or nullptr
};

template <class K>
struct Problem {
  using T = typename K::T;
  using A = typename K::A;
  typename K::Matrix w_in, w_out;  // [E, F_in, H] (gate rows, then up rows when gated), [E, H, F]
  const T* x_in;                   // [tokens, H]
  A* x;                            // [tokens, x_stride] in K's layout
  float* stage;                    // [slots, F] act(gate) * up
  A* act;                          // [slots, act_stride] the same in K's layout
  T* out;                          // [tokens, H]
  int64_t tokens, H, F, x_stride, act_stride;
  Epilogue ep;
  const T* b_in;
  const T* b_out;
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
inline float glu(float gate, float up, const Epilogue& ep) {
  if (ep.activation == kSwigluOai) {
    const float g = std::min(gate, ep.limit), u = std::max(-ep.limit, std::min(up, ep.limit));
    return (u + 1.f) * g / (1.f + std::exp(-ep.alpha * g));
  }
  const float a = apply_activation(gate, ep.activation);
  return ep.gated ? a * up : a;
}

// Up-phase unit: intermediate rows [f0, f0 + unit) of every activated expert.
template <class K>
void up_unit(const Problem<K>& p, int64_t f0, float* gate, float* up) {
  using A = typename K::A;
  const Routing& rt = *p.routing;
  const int64_t F = p.F, f1 = std::min(F, f0 + p.up.unit);
  const bool gated = p.ep.gated;
  const A* xrow[kTokens];
  for (size_t i = 0; i < rt.expert.size(); ++i) {
    const int64_t e = rt.expert[i];
    const auto* bias = p.b_in ? p.b_in + e * (gated ? 2 * F : F) : nullptr;
    for (int64_t f = f0; f < f1; f += p.up.pass) {
      const int64_t nb = std::min(p.up.pass, f1 - f);
      for (int64_t c = rt.start[i]; c < rt.start[i + 1]; c += kTokens) {
        const int n = static_cast<int>(std::min<int64_t>(kTokens, rt.start[i + 1] - c));
        for (int t = 0; t < n; ++t) xrow[t] = p.x + rt.token[c + t] * p.x_stride;
        run_n<K>(n, p.w_in, e, f, nb, f1, xrow, gate);
        if (gated) run_n<K>(n, p.w_in, e, F + f, nb, F + f1, xrow, up);
        for (int t = 0; t < n; ++t) {
          float* dst = p.stage + (c + t) * F + f;
          const float scale = p.ep.weights_on_input ? rt.weight[c + t] : 1.f;
          for (int64_t j = 0; j < nb; ++j) {
            float g = gate[j * n + t] * scale, u = gated ? up[j * n + t] * scale : 0.f;
            if (bias) {
              g += to_float(bias[f + j]);
              if (gated) u += to_float(bias[F + f + j]);
            }
            dst[j] = glu(g, u, p.ep);
          }
        }
      }
    }
  }
}

// Down-phase unit: output columns [h0, h0 + unit) summed over every activated expert, then stored.
template <class K>
void down_unit(const Problem<K>& p, int64_t h0, float* dots, float* acc) {
  using A = typename K::A;
  using T = typename K::T;
  const Routing& rt = *p.routing;
  const int64_t H = p.H, h1 = std::min(H, h0 + p.down.unit), width = h1 - h0;
  std::fill(acc, acc + p.tokens * width, 0.f);
  const A* xrow[kTokens];
  for (size_t i = 0; i < rt.expert.size(); ++i) {
    const int64_t e = rt.expert[i];
    const T* bias = p.b_out ? p.b_out + e * H : nullptr;
    for (int64_t h = h0; h < h1; h += p.down.pass) {
      const int64_t nb = std::min(p.down.pass, h1 - h);
      for (int64_t c = rt.start[i]; c < rt.start[i + 1]; c += kTokens) {
        const int n = static_cast<int>(std::min<int64_t>(kTokens, rt.start[i + 1] - c));
        for (int t = 0; t < n; ++t) xrow[t] = p.act + (c + t) * p.act_stride;
        run_n<K>(n, p.w_out, e, h, nb, h1, xrow, dots);
        for (int t = 0; t < n; ++t) {
          float* dst = acc + rt.token[c + t] * width + (h - h0);
          const float wt = p.ep.weights_on_input ? 1.f : rt.weight[c + t];
          if (bias) {
            for (int64_t j = 0; j < nb; ++j) dst[j] += wt * (dots[j * n + t] + to_float(bias[h + j]));
          } else {
            for (int64_t j = 0; j < nb; ++j) dst[j] += wt * dots[j * n + t];
          }
        }
      }
    }
  }
  for (int64_t t = 0; t < p.tokens; ++t)
    for (int64_t j = 0; j < width; ++j) p.out[t * H + h0 + j] = static_cast<T>(acc[t * width + j]);
}

// One thread's share of the four phases; `barrier` separates them (each needs the last complete).
template <class K, class Barrier>
void worker(const Problem<K>& p, std::atomic<int64_t>* next, Barrier barrier) {
  {
    std::vector<float> row(static_cast<size_t>(p.H));
    for (int64_t t = next[0].fetch_add(1); t < p.tokens; t = next[0].fetch_add(1)) {
      for (int64_t k = 0; k < p.H; ++k) row[k] = to_float(p.x_in[t * p.H + k]);
      K::prepare_row(row.data(), p.H, p.x + t * p.x_stride);
    }
  }
  barrier();
  {
    std::vector<float> gate(static_cast<size_t>(p.up.pass * kTokens)), up(gate.size());
    const int64_t up_units = (p.F + p.up.unit - 1) / p.up.unit;
    for (int64_t u = next[1].fetch_add(1); u < up_units; u = next[1].fetch_add(1))
      up_unit<K>(p, u * p.up.unit, gate.data(), up.data());
  }
  barrier();
  const int64_t slots = static_cast<int64_t>(p.routing->token.size());
  for (int64_t s = next[2].fetch_add(1); s < slots; s = next[2].fetch_add(1))
    K::prepare_row(p.stage + s * p.F, p.F, p.act + s * p.act_stride);
  barrier();
  std::vector<float> dots(static_cast<size_t>(p.down.pass * kTokens));
  std::vector<float> acc(static_cast<size_t>(p.down.unit * p.tokens));
  const int64_t down_units = (p.H + p.down.unit - 1) / p.down.unit;
  for (int64_t u = next[3].fetch_add(1); u < down_units; u = next[3].fetch_add(1))
    down_unit<K>(p, u * p.down.unit, dots.data(), acc.data());
}

// Every phase on every thread of one OpenMP team (one thread without OpenMP or when nested).
template <class K>
void run_phases(const Problem<K>& p) {
  std::atomic<int64_t> next[4];
  for (auto& n : next) n = 0;
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

// The layer's routed experts through family K: x [tokens, H] in K::T, the matrices, the routing.
template <class K>
at::Tensor run_experts(const at::Tensor& x, const typename K::Matrix& w_in, const typename K::Matrix& w_out,
                       int64_t F, const Routing& rt, const Epilogue& ep) {
  using T = typename K::T;
  using A = typename K::A;
  const int64_t tokens = x.size(0), H = x.size(1);
  const int64_t slots = static_cast<int64_t>(rt.token.size());
  const int64_t x_stride = K::row_elems(H), act_stride = K::row_elems(F);
  std::vector<A> xa(static_cast<size_t>(std::max<int64_t>(tokens * x_stride, 1)));
  std::vector<float> stage(static_cast<size_t>(std::max<int64_t>(slots * F, 1)));
  std::vector<A> act(static_cast<size_t>(std::max<int64_t>(slots * act_stride, 1)));
  at::Tensor out = at::empty({tokens, H}, x.options());
  const int64_t threads = std::max(1, at::get_num_threads());
  const Problem<K> p{w_in,
                     w_out,
                     x.data_ptr<T>(),
                     xa.data(),
                     stage.data(),
                     act.data(),
                     out.data_ptr<T>(),
                     tokens,
                     H,
                     F,
                     x_stride,
                     act_stride,
                     ep,
                     ep.b_in ? ep.b_in->data_ptr<T>() : nullptr,
                     ep.b_out ? ep.b_out->data_ptr<T>() : nullptr,
                     &rt,
                     blocking(F, K::row_bytes(w_in), threads),
                     blocking(H, K::row_bytes(w_out), threads)};
  run_phases<K>(p);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Argument checks and routing shared by the ops (`op` names the op in every message).
// ---------------------------------------------------------------------------------------------

inline void check_cpu_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// x [T, H] and the routing [T, k]; the activation code against `gated`.
inline void check_x_and_routing(const char* op, const at::Tensor& x, const at::Tensor& ids,
                                const at::Tensor& weights, bool gated, int64_t activation) {
  check_cpu_contiguous(x, op, "x");
  check_cpu_contiguous(ids, op, "topk_ids");
  check_cpu_contiguous(weights, op, "topk_weights");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [T, H], got ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat, op,
              ": x must be bfloat16, float16 or float32, got ", dtype);
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

inline void check_bias(const char* op, const std::optional<at::Tensor>& b, const at::Tensor& x, int64_t E, int64_t n,
                       const char* name) {
  if (!b.has_value()) return;
  TORCH_CHECK(b->device().is_cpu() && b->is_contiguous(), op, ": ", name, " must be a contiguous CPU tensor");
  TORCH_CHECK(b->scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(), ", got ",
              b->scalar_type());
  TORCH_CHECK(b->dim() == 2 && b->size(0) == E && b->size(1) == n, op, ": ", name, " must be [E=", E, ", ", n,
              "], got ", b->sizes());
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
inline Routing sort_by_expert(const char* op, const at::Tensor& ids_t, const at::Tensor& weights_t, int64_t E) {
  const std::vector<int64_t> ids = ids_t.scalar_type() == at::kLong ? read_ids<int64_t>(ids_t) : read_ids<int32_t>(ids_t);
  std::vector<float> wts;
  switch (weights_t.scalar_type()) {
    case at::kFloat: wts = read_weights<float>(weights_t); break;
    case at::kDouble: wts = read_weights<double>(weights_t); break;
    case at::kHalf: wts = read_weights<half>(weights_t); break;
    case at::kBFloat16: wts = read_weights<bf16>(weights_t); break;
    default: TORCH_CHECK(false, op, ": unsupported topk_weights dtype ", weights_t.scalar_type());
  }
  const int64_t k = ids_t.size(1);
  std::vector<int64_t> count(static_cast<size_t>(E) + 1, 0);
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t e = ids[i];
    TORCH_CHECK(e >= 0 && e < E, op, ": expert id ", e, " at topk_ids[", static_cast<int64_t>(i) / k, ", ",
                static_cast<int64_t>(i) % k, "] is outside [0, ", E, ")");
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

inline Epilogue make_epilogue(bool gated, int64_t activation, double alpha, double limit, bool weights_on_input,
                              const std::optional<at::Tensor>& b_in, const std::optional<at::Tensor>& b_out) {
  return {gated,
          activation,
          static_cast<float>(alpha),
          static_cast<float>(limit),
          weights_on_input,
          b_in.has_value() ? &*b_in : nullptr,
          b_out.has_value() ? &*b_out : nullptr};
}

}  // namespace cpu
}  // namespace moecap
