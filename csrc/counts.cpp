// moecap::count_routing: adds one forward's expert-activation counts to an int64
// accumulator that lives on the routing's device, without synchronising the host.
//
// stats layout, int64 [E + 6], every entry is added to (never overwritten):
//   [0, E)  tokens_per_expert     routed (token, expert) pairs per expert
//   E + 0   activated_experts     experts with at least one pair in this forward
//   E + 1   routed_pairs          in-range pairs
//   E + 2   expert_weight_bytes   activated_experts * expert_weight_bytes
//   E + 3   expert_flops          routed_pairs * expert_flops_per_pair
//   E + 4   forwards              1 per call
//   E + 5   invalid_ids           ids outside [0, E), counted nowhere else
//
// Only light headers: this file is JIT-compiled on a user's first run.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#ifdef MOECAP_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "counts_cuda.h"
#endif

namespace moecap {
namespace {

constexpr int64_t kNumTotals = 6;

void check_args(const at::Tensor& topk_ids, const at::Tensor& stats, int64_t num_experts) {
  TORCH_CHECK(num_experts > 0, "count_routing: num_experts must be positive, got ", num_experts);
  TORCH_CHECK(topk_ids.scalar_type() == at::kLong, "count_routing: topk_ids must be int64, got ",
              topk_ids.scalar_type());
  TORCH_CHECK(topk_ids.dim() == 2, "count_routing: topk_ids must be 2-D [T, k], got ", topk_ids.dim(),
              "-D");
  TORCH_CHECK(stats.scalar_type() == at::kLong, "count_routing: stats must be int64, got ",
              stats.scalar_type());
  TORCH_CHECK(stats.dim() == 1 && stats.size(0) == num_experts + kNumTotals,
              "count_routing: stats must be 1-D of size num_experts + ", kNumTotals, " = ",
              num_experts + kNumTotals, ", got ", stats.sizes());
  TORCH_CHECK(stats.is_contiguous(), "count_routing: stats must be contiguous");
  TORCH_CHECK(topk_ids.device() == stats.device(), "count_routing: topk_ids is on ", topk_ids.device(),
              " but stats is on ", stats.device());
}

void count_routing_cpu(const at::Tensor& topk_ids, const at::Tensor& stats, int64_t num_experts,
                       int64_t expert_weight_bytes, int64_t expert_flops_per_pair) {
  check_args(topk_ids, stats, num_experts);
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const int64_t n_pairs = ids.numel();

  std::vector<int64_t> hist(static_cast<size_t>(num_experts), 0);
  int64_t invalid = 0;
  for (int64_t i = 0; i < n_pairs; ++i) {
    const int64_t expert = id[i];
    if (expert >= 0 && expert < num_experts) {
      ++hist[static_cast<size_t>(expert)];
    } else {
      ++invalid;
    }
  }

  int64_t* out = stats.mutable_data_ptr<int64_t>();
  int64_t activated = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    out[e] += hist[static_cast<size_t>(e)];
    activated += hist[static_cast<size_t>(e)] != 0 ? 1 : 0;
  }
  const int64_t routed = n_pairs - invalid;
  int64_t* totals = out + num_experts;
  totals[0] += activated;
  totals[1] += routed;
  totals[2] += activated * expert_weight_bytes;
  totals[3] += routed * expert_flops_per_pair;
  totals[4] += 1;
  totals[5] += invalid;
}

#ifdef MOECAP_WITH_CUDA
void count_routing_cuda(const at::Tensor& topk_ids, const at::Tensor& stats, int64_t num_experts,
                        int64_t expert_weight_bytes, int64_t expert_flops_per_pair) {
  check_args(topk_ids, stats, num_experts);
  TORCH_CHECK(num_experts <= kMaxCountExperts, "count_routing: CUDA supports at most ", kMaxCountExperts,
              " experts, got ", num_experts);
  TORCH_CHECK(topk_ids.numel() <= static_cast<int64_t>(UINT32_MAX),
              "count_routing: too many pairs in one forward: ", topk_ids.numel());
  const c10::cuda::CUDAGuard guard(stats.device());
  const at::Tensor ids = topk_ids.contiguous();
  C10_CUDA_CHECK(launch_count_routing(ids.const_data_ptr<int64_t>(), ids.numel(), num_experts,
                                      expert_weight_bytes, expert_flops_per_pair,
                                      stats.mutable_data_ptr<int64_t>(),
                                      at::cuda::getCurrentCUDAStream().stream()));
}
#endif

}  // namespace
}  // namespace moecap

TORCH_LIBRARY_FRAGMENT(moecap, m) {
  m.def(
      "count_routing(Tensor topk_ids, Tensor(a!) stats, int num_experts, int expert_weight_bytes, "
      "int expert_flops_per_pair) -> ()");
}

TORCH_LIBRARY_IMPL(moecap, CPU, m) {
  m.impl("count_routing", &moecap::count_routing_cpu);
}

#ifdef MOECAP_WITH_CUDA
TORCH_LIBRARY_IMPL(moecap, CUDA, m) {
  m.impl("count_routing", &moecap::count_routing_cuda);
}
#endif
