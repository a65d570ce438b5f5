// moecap::align_tokens: the token alignment of a fused-MoE grouped GEMM. Sorts one forward's routed
// (token, slot) pairs by expert, each expert's rows padded to a multiple of block_m, so that every
// M-block of the GEMM belongs to a single expert. Same contract, bit for bit, as the torch version
// moecap_kernels/kernels/align.py:align_tokens.
//
// Schema:
//   align_tokens(Tensor topk_ids, int num_experts, int block_m)
//       -> (Tensor sorted_pair_ids, Tensor block_expert_ids, Tensor num_padded)
//   topk_ids int64 or int32 [T, k]; pair p = t * k + j has expert topk_ids[t, j]; N = T * k.
//   n_e = pairs of expert e; P_e = ceil(n_e / block_m) * block_m (0 for an expert without pairs).
//   max_padded = N + min(E, N) * (block_m - 1), rounded up to a multiple of block_m: a static bound
//   on sum_e P_e (at most min(E, N) experts get a pair, each wastes < block_m rows), so outputs are
//   sized without reading the routing on the host.
//   sorted_pair_ids int32 [max_padded]: expert e's segment starts at sum_{e' < e} P_e' and holds its
//     pair indices in increasing order (a stable sort), then the sentinel N up to P_e entries;
//     every entry from sum_e P_e on is N too.
//   block_expert_ids int32 [max_padded / block_m]: the expert owning each block of block_m rows,
//     -1 for blocks from sum_e P_e on.
//   num_padded int32 [1]: sum_e P_e, on topk_ids' device (never read on the host here).
//   Ids outside [0, E): CPU raises (checked before anything is written). CUDA cannot check without
//   a host sync, so such pairs are dropped: they are in no segment and in no count, and their pair
//   index appears nowhere in sorted_pair_ids (the sentinel stays N).
//   Limits: N, block_m and max_padded fit in int32; on CUDA E <= 65536 (and the device's shared
//   memory, 4 bytes per expert).
//
// CPU: a counting sort, O(N + E + max_padded). CUDA: csrc/align_cuda.cu (three kernels on the current
// stream, an int32 workspace of about E * min(1024, N / 4096) entries, no host sync).
// Only light headers: this file is JIT-compiled on a user's first run.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#ifdef MOECAP_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "align_cuda.h"
#endif

namespace moecap {
namespace {

using AlignedTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// Checks the arguments and returns max_padded, the static bound on the padded row count.
int64_t check_and_bound(const at::Tensor& topk_ids, int64_t num_experts, int64_t block_m) {
  TORCH_CHECK(num_experts > 0, "align_tokens: num_experts must be positive, got ", num_experts);
  TORCH_CHECK(block_m > 0 && block_m <= kInt32Max, "align_tokens: block_m must be in [1, 2^31), got ",
              block_m);
  TORCH_CHECK(topk_ids.scalar_type() == at::kLong || topk_ids.scalar_type() == at::kInt,
              "align_tokens: topk_ids must be int64 or int32, got ", topk_ids.scalar_type());
  TORCH_CHECK(topk_ids.dim() == 2, "align_tokens: topk_ids must be 2-D [T, k], got ", topk_ids.dim(), "-D");
  const int64_t n_pairs = topk_ids.numel();
  TORCH_CHECK(n_pairs <= kInt32Max, "align_tokens: too many pairs for int32 indices: ", n_pairs);
  // Both factors are below 2^31, so the product cannot overflow int64.
  const int64_t bound = n_pairs + std::min(num_experts, n_pairs) * (block_m - 1);
  const int64_t max_padded = (bound + block_m - 1) / block_m * block_m;
  TORCH_CHECK(max_padded <= kInt32Max, "align_tokens: padded row bound ", max_padded,
              " does not fit in int32 (pairs ", n_pairs, ", block_m ", block_m, ")");
  return max_padded;
}

AlignedTensors allocate_outputs(const at::Tensor& topk_ids, int64_t max_padded, int64_t block_m) {
  const auto options = topk_ids.options().dtype(at::kInt);
  return {at::empty({max_padded}, options), at::empty({max_padded / block_m}, options),
          at::empty({1}, options)};
}

// Counting sort of the pairs by expert: counts, padded starts, then one in-order placement pass.
template <typename Id>
void align_cpu_impl(const Id* ids, int64_t n_pairs, int64_t num_experts, int64_t block_m, int64_t max_padded,
                    int32_t* sorted_pair_ids, int32_t* block_expert_ids, int32_t* num_padded) {
  std::vector<int64_t> cursor(static_cast<size_t>(num_experts), 0);
  for (int64_t p = 0; p < n_pairs; ++p) {
    const int64_t expert = static_cast<int64_t>(ids[p]);
    TORCH_CHECK(expert >= 0 && expert < num_experts, "align_tokens: topk_ids holds expert id ", expert,
                " at flat index ", p, ", outside [0, ", num_experts, ")");
    ++cursor[static_cast<size_t>(expert)];
  }

  // cursor[e]: pairs of e -> start of e's padded segment; blocks are labelled on the way.
  int64_t total = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t padded = (cursor[static_cast<size_t>(e)] + block_m - 1) / block_m * block_m;
    cursor[static_cast<size_t>(e)] = total;
    std::fill(block_expert_ids + total / block_m, block_expert_ids + (total + padded) / block_m,
              static_cast<int32_t>(e));
    total += padded;
  }
  std::fill(block_expert_ids + total / block_m, block_expert_ids + max_padded / block_m, int32_t{-1});
  num_padded[0] = static_cast<int32_t>(total);

  std::fill(sorted_pair_ids, sorted_pair_ids + max_padded, static_cast<int32_t>(n_pairs));
  for (int64_t p = 0; p < n_pairs; ++p) {
    sorted_pair_ids[cursor[static_cast<size_t>(ids[p])]++] = static_cast<int32_t>(p);
  }
}

AlignedTensors align_tokens_cpu(const at::Tensor& topk_ids, int64_t num_experts, int64_t block_m) {
  const int64_t max_padded = check_and_bound(topk_ids, num_experts, block_m);
  const at::Tensor ids = topk_ids.contiguous();
  AlignedTensors out = allocate_outputs(ids, max_padded, block_m);
  int32_t* sorted = std::get<0>(out).mutable_data_ptr<int32_t>();
  int32_t* blocks = std::get<1>(out).mutable_data_ptr<int32_t>();
  int32_t* padded = std::get<2>(out).mutable_data_ptr<int32_t>();
  if (ids.scalar_type() == at::kLong) {
    align_cpu_impl(ids.const_data_ptr<int64_t>(), ids.numel(), num_experts, block_m, max_padded, sorted,
                   blocks, padded);
  } else {
    align_cpu_impl(ids.const_data_ptr<int32_t>(), ids.numel(), num_experts, block_m, max_padded, sorted,
                   blocks, padded);
  }
  return out;
}

#ifdef MOECAP_WITH_CUDA
AlignedTensors align_tokens_cuda(const at::Tensor& topk_ids, int64_t num_experts, int64_t block_m) {
  const int64_t max_padded = check_and_bound(topk_ids, num_experts, block_m);
  TORCH_CHECK(num_experts <= kMaxAlignExperts, "align_tokens: CUDA supports at most ", kMaxAlignExperts,
              " experts, got ", num_experts);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t n_pairs = ids.numel();
  AlignedTensors out = allocate_outputs(ids, max_padded, block_m);
  // Freed back to the caching allocator on return; reuse is ordered after our kernels on this stream.
  const at::Tensor workspace =
      at::empty({align_workspace_ints(n_pairs, num_experts)}, ids.options().dtype(at::kInt));
  int32_t* ws = workspace.mutable_data_ptr<int32_t>();
  int32_t* sorted = std::get<0>(out).mutable_data_ptr<int32_t>();
  int32_t* blocks = std::get<1>(out).mutable_data_ptr<int32_t>();
  int32_t* padded = std::get<2>(out).mutable_data_ptr<int32_t>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  if (ids.scalar_type() == at::kLong) {
    C10_CUDA_CHECK(launch_align_tokens(ids.const_data_ptr<int64_t>(), n_pairs, num_experts, block_m,
                                       max_padded, ws, sorted, blocks, padded, stream));
  } else {
    C10_CUDA_CHECK(launch_align_tokens(ids.const_data_ptr<int32_t>(), n_pairs, num_experts, block_m,
                                       max_padded, ws, sorted, blocks, padded, stream));
  }
  return out;
}
#endif

}  // namespace
}  // namespace moecap

TORCH_LIBRARY_FRAGMENT(moecap, m) {
  m.def(
      "align_tokens(Tensor topk_ids, int num_experts, int block_m) -> (Tensor sorted_pair_ids, "
      "Tensor block_expert_ids, Tensor num_padded)");
}

TORCH_LIBRARY_IMPL(moecap, CPU, m) {
  m.impl("align_tokens", &moecap::align_tokens_cpu);
}

#ifdef MOECAP_WITH_CUDA
TORCH_LIBRARY_IMPL(moecap, CUDA, m) {
  m.impl("align_tokens", &moecap::align_tokens_cuda);
}
#endif
