// The CUDA routing counter's kernel (see counts_cuda.cu for its launcher).
#pragma once

// Device code only (see device_types.cuh): nvcc builds it into the extension, NVRTC through CuPy.
#include "device_types.cuh"

namespace moecap {
namespace counts {

constexpr int kThreads = 1024;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr unsigned kNoBin = 0xffffffffu;  // lanes past the end of the ids

// Counts `bin` into `hist`; lanes with the same bin add once, so a hot expert costs
// one shared atomic per warp instead of 32. Must be reached by the whole warp.
__device__ __forceinline__ void count_bin(unsigned* hist, unsigned bin) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
  const unsigned peers = __match_any_sync(kFullMask, bin);
  const int lane = threadIdx.x % kWarpSize;
  if (bin != kNoBin && lane == __ffs(peers) - 1) atomicAdd(hist + bin, __popc(peers));
#else
  if (bin != kNoBin) atomicAdd(hist + bin, 1u);
#endif
}

// Sums three per-thread values over the block; the totals are valid in thread 0.
__device__ __forceinline__ void block_sum3(long long& a, long long& b, long long& c) {
  __shared__ long long partial[3][kWarps];
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    a += __shfl_down_sync(kFullMask, a, offset);
    b += __shfl_down_sync(kFullMask, b, offset);
    c += __shfl_down_sync(kFullMask, c, offset);
  }
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  if (lane == 0) {
    partial[0][warp] = a;
    partial[1][warp] = b;
    partial[2][warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    a = partial[0][lane];
    b = partial[1][lane];
    c = partial[2][lane];
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      a += __shfl_down_sync(kFullMask, a, offset);
      b += __shfl_down_sync(kFullMask, b, offset);
      c += __shfl_down_sync(kFullMask, c, offset);
    }
  }
}

__device__ __forceinline__ void add_i64(int64_t* dst, long long value) {
  // Two's-complement addition is the same signed or unsigned.
  atomicAdd(reinterpret_cast<unsigned long long*>(dst), static_cast<unsigned long long>(value));
}

// Launched with exactly one block of kThreads threads and (E + 1) * 4 bytes of dynamic
// shared memory: bins 0..E-1 count pairs per expert, bin E counts out-of-range ids.
__global__ void __launch_bounds__(kThreads)
    count_routing_kernel(const int64_t* __restrict__ ids, int64_t n_pairs, int64_t num_experts,
                         int64_t expert_weight_bytes, int64_t expert_flops_per_pair,
                         int64_t* __restrict__ stats) {
  extern __shared__ unsigned hist[];
  const unsigned invalid_bin = static_cast<unsigned>(num_experts);
  for (int64_t e = threadIdx.x; e <= num_experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();

  // Every thread runs the same number of iterations so whole warps stay converged.
  for (int64_t base = 0; base < n_pairs; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    unsigned bin = kNoBin;
    if (i < n_pairs) {
      const int64_t expert = ids[i];
      bin = (expert >= 0 && expert < num_experts) ? static_cast<unsigned>(expert) : invalid_bin;
    }
    count_bin(hist, bin);
  }
  __syncthreads();

  long long activated = 0;
  long long routed = 0;
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    const unsigned count = hist[e];
    if (count != 0) {
      add_i64(stats + e, count);
      activated += 1;
      routed += count;
    }
  }
  long long invalid = threadIdx.x == 0 ? static_cast<long long>(hist[invalid_bin]) : 0;
  block_sum3(activated, routed, invalid);

  if (threadIdx.x == 0) {
    int64_t* totals = stats + num_experts;
    add_i64(totals + 0, activated);
    add_i64(totals + 1, routed);
    add_i64(totals + 2, activated * expert_weight_bytes);
    add_i64(totals + 3, routed * expert_flops_per_pair);
    add_i64(totals + 4, 1);
    add_i64(totals + 5, invalid);
  }
}

}  // namespace counts
}  // namespace moecap
