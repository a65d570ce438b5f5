// The CUDA token alignment's three kernels (see align_cuda.cu for the launcher and the algorithm).
#pragma once

// Device code only (see device_types.cuh): nvcc builds it into the extension, NVRTC through CuPy.
#include "device_types.cuh"

namespace moecap {
namespace align {

constexpr int kThreads = 256;  // kernels 1 and 3; equals kAlignChunkGranule (align_cuda.h)
constexpr int kScanThreads = 1024;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kScanWarps = kScanThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr unsigned kNoBin = 0xffffffffu;  // lanes past the chunk end or holding an invalid id

// Lanes of this warp holding the same key (including the caller). Must be reached by the whole warp.
__device__ __forceinline__ unsigned warp_peers(unsigned key) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
  return __match_any_sync(kFullMask, key);
#else
  unsigned peers = 0;
  for (int j = 0; j < kWarpSize; ++j) {
    if (__shfl_sync(kFullMask, key, j) == key) peers |= 1u << j;
  }
  return peers;
#endif
}

// The expert of pair i as a bin, or kNoBin when i is past `end` or the id is out of range.
template <typename Id>
__device__ __forceinline__ unsigned expert_bin(const Id* __restrict__ ids, int64_t i, int64_t end,
                                               int64_t num_experts) {
  if (i >= end) return kNoBin;
  const int64_t expert = static_cast<int64_t>(ids[i]);
  return (expert >= 0 && expert < num_experts) ? static_cast<unsigned>(expert) : kNoBin;
}

// Grid: max(chunks, fill blocks) x kThreads, E * 4 bytes of dynamic shared memory.
template <typename Id>
__global__ void __launch_bounds__(kThreads)
    chunk_histogram_kernel(const Id* __restrict__ ids, int64_t n_pairs, int64_t num_experts,
                           int64_t chunk_pairs, int64_t num_chunks, int32_t* __restrict__ chunk_counts,
                           int32_t* __restrict__ sorted_pair_ids, int64_t max_padded) {
  extern __shared__ int hist[];
  const int64_t chunk = blockIdx.x;
  if (chunk < num_chunks) {  // uniform over the block
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    const int64_t begin = chunk * chunk_pairs;
    const int64_t end = begin + chunk_pairs < n_pairs ? begin + chunk_pairs : n_pairs;
    // Same trip count for every thread, so whole warps reach warp_peers.
    for (int64_t base = begin; base < end; base += blockDim.x) {
      const unsigned bin = expert_bin(ids, base + threadIdx.x, end, num_experts);
      const unsigned peers = warp_peers(bin);
      const unsigned lane = threadIdx.x % kWarpSize;
      // One shared atomic per (warp, expert); counts are exact whatever the order.
      if (bin != kNoBin && lane == static_cast<unsigned>(__ffs(peers) - 1)) {
        atomicAdd(hist + bin, __popc(peers));
      }
    }
    __syncthreads();
    int32_t* row = chunk_counts + chunk * num_experts;
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) row[e] = hist[e];
  }

  const int32_t sentinel = static_cast<int32_t>(n_pairs);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < max_padded; i += stride) {
    sorted_pair_ids[i] = sentinel;
  }
}

// Exclusive scan of one value per thread over a kScanThreads block; also returns the block total.
__device__ __forceinline__ long long block_exclusive_scan(long long value, long long& total) {
  __shared__ long long warp_sums[kScanWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  long long inclusive = value;
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const long long up = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == kWarpSize - 1) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    long long sum = warp_sums[lane];  // kScanWarps == kWarpSize
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      const long long up = __shfl_up_sync(kFullMask, sum, offset);
      if (lane >= offset) sum += up;
    }
    warp_sums[lane] = sum;  // inclusive over warps
  }
  __syncthreads();
  total = warp_sums[kScanWarps - 1];
  const long long before_warp = warp == 0 ? 0 : warp_sums[warp - 1];
  return before_warp + inclusive - value;
}

// One block of kScanThreads threads.
__global__ void __launch_bounds__(kScanThreads)
    scan_kernel(int32_t* __restrict__ chunk_counts, int64_t num_chunks, int64_t num_experts, int64_t block_m,
                int32_t* __restrict__ padded_start, int32_t* __restrict__ padded_end,
                int32_t* __restrict__ num_padded) {
  static_assert(kScanWarps == kWarpSize, "block_exclusive_scan scans the warp sums with one warp");
  // Columns: expert e's chunk counts become pairs of e in earlier chunks; padded size -> padded_end.
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int32_t running = 0;
    for (int64_t c = 0; c < num_chunks; ++c) {
      int32_t* cell = chunk_counts + c * num_experts + e;
      const int32_t count = *cell;
      *cell = running;
      running += count;
    }
    padded_end[e] = static_cast<int32_t>((running + block_m - 1) / block_m * block_m);
  }
  __syncthreads();  // makes the global writes above visible to the whole block

  // Rows: thread t owns experts [lo, hi) and scans their padded sizes in order.
  const int64_t per_thread = (num_experts + blockDim.x - 1) / blockDim.x;
  const int64_t lo = threadIdx.x * per_thread < num_experts ? threadIdx.x * per_thread : num_experts;
  const int64_t hi = lo + per_thread < num_experts ? lo + per_thread : num_experts;
  long long own = 0;
  for (int64_t e = lo; e < hi; ++e) own += padded_end[e];
  long long total = 0;
  long long running = block_exclusive_scan(own, total);
  for (int64_t e = lo; e < hi; ++e) {
    const long long size = padded_end[e];
    padded_start[e] = static_cast<int32_t>(running);
    running += size;
    padded_end[e] = static_cast<int32_t>(running);
  }
  if (threadIdx.x == 0) num_padded[0] = static_cast<int32_t>(total);
}

// Grid: max(chunks, block-id blocks) x kThreads, E * 4 bytes of dynamic shared memory.
template <typename Id>
__global__ void __launch_bounds__(kThreads)
    scatter_kernel(const Id* __restrict__ ids, int64_t n_pairs, int64_t num_experts, int64_t chunk_pairs,
                   int64_t num_chunks, const int32_t* __restrict__ chunk_offsets,
                   const int32_t* __restrict__ padded_start, const int32_t* __restrict__ padded_end,
                   const int32_t* __restrict__ num_padded, int64_t block_m, int64_t max_blocks,
                   int32_t* __restrict__ sorted_pair_ids, int32_t* __restrict__ block_expert_ids) {
  extern __shared__ int cursor[];
  const int64_t chunk = blockIdx.x;
  if (chunk < num_chunks) {  // uniform over the block
    const int32_t* row = chunk_offsets + chunk * num_experts;
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) cursor[e] = padded_start[e] + row[e];
    __syncthreads();
    const int64_t begin = chunk * chunk_pairs;
    const int64_t end = begin + chunk_pairs < n_pairs ? begin + chunk_pairs : n_pairs;
    const unsigned lane = threadIdx.x % kWarpSize;
    const unsigned warp = threadIdx.x / kWarpSize;
    const unsigned lanes_before = (1u << lane) - 1u;
    for (int64_t base = begin; base < end; base += blockDim.x) {
      const int64_t i = base + threadIdx.x;
      const unsigned bin = expert_bin(ids, i, end, num_experts);
      const unsigned peers = warp_peers(bin);
      const int rank = __popc(peers & lanes_before);  // earlier lanes with the same expert
      // Warps take turns so that earlier pairs of the tile claim their slots first.
      for (unsigned turn = 0; turn < kWarps; ++turn) {
        int32_t slot = 0;
        if (warp == turn && bin != kNoBin) {
          slot = cursor[bin] + rank;
          sorted_pair_ids[slot] = static_cast<int32_t>(i);
        }
        __syncwarp();  // every lane has read cursor[bin] before the first lane of its group moves it
        if (warp == turn && bin != kNoBin && rank == 0) cursor[bin] = slot + __popc(peers);
        __syncthreads();
      }
    }
  }

  // block_expert_ids: the first expert whose padded segment ends after the block's first row.
  const int64_t total = num_padded[0];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < max_blocks; b += stride) {
    const int64_t first_row = b * block_m;
    int32_t owner = -1;
    if (first_row < total) {
      int64_t lo = 0;
      int64_t hi = num_experts - 1;  // padded_end[E - 1] == total > first_row
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (padded_end[mid] > first_row) {
          hi = mid;
        } else {
          lo = mid + 1;
        }
      }
      owner = static_cast<int32_t>(lo);
    }
    block_expert_ids[b] = owner;
  }
}

}  // namespace align
}  // namespace moecap
