// CUDA routing counter: one block builds a shared-memory histogram of the expert ids of
// one forward, then folds it into the int64 stats accumulator with atomics. No torch
// headers, so `nvcc -c` works without a CUDA build of torch; no host synchronisation.
#include "counts_cuda.h"
#include "counts_kernels.cuh"

#include <cstdint>

namespace moecap {
namespace {

constexpr size_t kDefaultSharedBytes = 48 * 1024;
using counts::count_routing_kernel;
using counts::kThreads;

}  // namespace

cudaError_t launch_count_routing(const int64_t* ids, int64_t n_pairs, int64_t num_experts,
                                 int64_t expert_weight_bytes, int64_t expert_flops_per_pair,
                                 int64_t* stats, cudaStream_t stream) {
  if (num_experts <= 0 || num_experts > kMaxCountExperts || n_pairs < 0 ||
      n_pairs > static_cast<int64_t>(UINT32_MAX)) {
    return cudaErrorInvalidValue;
  }
  const size_t shared_bytes = static_cast<size_t>(num_experts + 1) * sizeof(unsigned);
  if (shared_bytes > kDefaultSharedBytes) {
    // Opting in above 48 KiB; fails cleanly if the device has less shared memory.
    const cudaError_t err = cudaFuncSetAttribute(
        count_routing_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
    if (err != cudaSuccess) return err;
  }
  count_routing_kernel<<<1, kThreads, shared_bytes, stream>>>(
      ids, n_pairs, num_experts, expert_weight_bytes, expert_flops_per_pair, stats);
  return cudaGetLastError();
}

}  // namespace moecap
