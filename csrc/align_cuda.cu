// CUDA token alignment: sorts one forward's routed pairs by expert (stable) into block_m-padded
// segments, in three kernels on one stream and without host synchronisation:
//   1. chunk_histogram: block c counts the experts of pair chunk c into workspace row c; every
//      block also fills sorted_pair_ids with the sentinel (grid-stride).
//   2. scan (one block): turns each expert's column of chunk counts into an exclusive prefix
//      over chunks, then scans the padded expert sizes into padded_start / padded_end and
//      writes num_padded.
//   3. scatter: block c starts one cursor per expert at padded_start[e] + (pairs of e in earlier
//      chunks) and walks its chunk in order, tile by tile and, inside a tile, warp by warp, so
//      that pairs of one expert land in increasing pair order (the layout is deterministic).
//      Every block also writes block_expert_ids by binary search in padded_end (grid-stride).
// No torch headers, so `nvcc -c` works without a CUDA build of torch.
#include "align_cuda.h"
#include "align_kernels.cuh"

#include <cstdint>
#include <initializer_list>

namespace moecap {
namespace {

constexpr size_t kDefaultSharedBytes = 48 * 1024;
constexpr int64_t kMaxFillBlocks = 4096;  // grid-stride cap for the fill loops
using align::chunk_histogram_kernel;
using align::kScanThreads;
using align::kThreads;
using align::scan_kernel;
using align::scatter_kernel;

static_assert(kThreads == kAlignChunkGranule, "chunk sizes must be whole tiles");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a kernel that runs `num_chunks` chunk blocks and grid-strides over `items` items.
int64_t grid_size(int64_t num_chunks, int64_t items) {
  int64_t fill = ceil_div(items, kThreads);
  fill = fill < kMaxFillBlocks ? fill : kMaxFillBlocks;
  return num_chunks > fill ? num_chunks : fill;
}

template <typename Id>
cudaError_t launch_impl(const Id* ids, int64_t n_pairs, int64_t num_experts, int64_t block_m,
                        int64_t max_padded, int32_t* workspace, int32_t* sorted_pair_ids,
                        int32_t* block_expert_ids, int32_t* num_padded, cudaStream_t stream) {
  if (num_experts <= 0 || num_experts > kMaxAlignExperts || block_m <= 0 || n_pairs < 0 ||
      n_pairs > INT32_MAX || max_padded < 0 || max_padded > INT32_MAX || max_padded % block_m != 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t chunk_pairs = align_chunk_pairs(n_pairs);
  const int64_t num_chunks = align_num_chunks(n_pairs);
  const int64_t max_blocks = max_padded / block_m;
  int32_t* chunk_counts = workspace;
  int32_t* padded_start = workspace + num_chunks * num_experts;
  int32_t* padded_end = padded_start + num_experts;

  const size_t shared_bytes = static_cast<size_t>(num_experts) * sizeof(int);
  if (shared_bytes > kDefaultSharedBytes) {
    // Opting in above 48 KiB; fails cleanly if the device has less shared memory.
    for (const void* kernel : {reinterpret_cast<const void*>(chunk_histogram_kernel<Id>),
                               reinterpret_cast<const void*>(scatter_kernel<Id>)}) {
      const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(shared_bytes));
      if (err != cudaSuccess) return err;
    }
  }

  const int64_t grid1 = grid_size(num_chunks, max_padded);
  if (grid1 > 0) {
    chunk_histogram_kernel<Id><<<static_cast<unsigned>(grid1), kThreads, shared_bytes, stream>>>(
        ids, n_pairs, num_experts, chunk_pairs, num_chunks, chunk_counts, sorted_pair_ids, max_padded);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }

  scan_kernel<<<1, kScanThreads, 0, stream>>>(chunk_counts, num_chunks, num_experts, block_m, padded_start,
                                              padded_end, num_padded);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int64_t grid3 = grid_size(num_chunks, max_blocks);
  if (grid3 > 0) {
    scatter_kernel<Id><<<static_cast<unsigned>(grid3), kThreads, shared_bytes, stream>>>(
        ids, n_pairs, num_experts, chunk_pairs, num_chunks, chunk_counts, padded_start, padded_end,
        num_padded, block_m, max_blocks, sorted_pair_ids, block_expert_ids);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace

cudaError_t launch_align_tokens(const int64_t* ids, int64_t n_pairs, int64_t num_experts, int64_t block_m,
                                int64_t max_padded, int32_t* workspace, int32_t* sorted_pair_ids,
                                int32_t* block_expert_ids, int32_t* num_padded, cudaStream_t stream) {
  return launch_impl(ids, n_pairs, num_experts, block_m, max_padded, workspace, sorted_pair_ids,
                     block_expert_ids, num_padded, stream);
}

cudaError_t launch_align_tokens(const int32_t* ids, int64_t n_pairs, int64_t num_experts, int64_t block_m,
                                int64_t max_padded, int32_t* workspace, int32_t* sorted_pair_ids,
                                int32_t* block_expert_ids, int32_t* num_padded, cudaStream_t stream) {
  return launch_impl(ids, n_pairs, num_experts, block_m, max_padded, workspace, sorted_pair_ids,
                     block_expert_ids, num_padded, stream);
}

}  // namespace moecap
