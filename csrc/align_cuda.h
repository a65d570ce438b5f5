// Launcher for the CUDA token alignment (see csrc/align.cpp for the op's contract). Plain C++
// (no torch headers) so that the .cu file builds with nvcc alone and the .cpp side stays light.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace moecap {

// Largest expert count accepted. The histogram and scatter kernels keep one int per expert in
// shared memory; above 48 KiB (12288 experts) the launcher opts in to more, which fails cleanly
// on devices that have less.
constexpr int64_t kMaxAlignExperts = 1 << 16;

// Pairs are processed in chunks, one thread block per chunk; each chunk's per-expert counts sit
// in the workspace. A chunk holds at least kAlignChunkPairs pairs and there are at most
// kAlignMaxChunks chunks, so the workspace stays at most kAlignMaxChunks * E ints.
constexpr int64_t kAlignChunkPairs = 4096;
constexpr int64_t kAlignMaxChunks = 1024;
constexpr int64_t kAlignChunkGranule = 256;  // chunk sizes are multiples of this (the block size)

// Pairs per chunk for `n_pairs` routed pairs.
inline int64_t align_chunk_pairs(int64_t n_pairs) {
  const int64_t spread = (n_pairs + kAlignMaxChunks - 1) / kAlignMaxChunks;
  const int64_t rounded = (spread + kAlignChunkGranule - 1) / kAlignChunkGranule * kAlignChunkGranule;
  return rounded > kAlignChunkPairs ? rounded : kAlignChunkPairs;
}

// Number of chunks (0 when there are no pairs).
inline int64_t align_num_chunks(int64_t n_pairs) {
  const int64_t chunk = align_chunk_pairs(n_pairs);
  return (n_pairs + chunk - 1) / chunk;
}

// int32 elements of device workspace the launcher needs: per-chunk counts [chunks, E], then
// padded_start [E] and padded_end [E]. Its contents on entry do not matter.
inline int64_t align_workspace_ints(int64_t n_pairs, int64_t num_experts) {
  return (align_num_chunks(n_pairs) + 2) * num_experts;
}

// Writes the aligned layout of `n_pairs` expert ids (device memory, int64 or int32; pair p is
// ids[p]) into sorted_pair_ids [max_padded], block_expert_ids [max_padded / block_m] and
// num_padded [1], all int32 device memory. `max_padded` must be a multiple of block_m and at least
// the padded total (align.cpp passes the static bound). Ids outside [0, num_experts) are dropped:
// they appear in no segment and add to no count. Enqueued on `stream` (three kernels); never
// synchronises the host. Returns the first launch error.
cudaError_t launch_align_tokens(const int64_t* ids, int64_t n_pairs, int64_t num_experts, int64_t block_m,
                                int64_t max_padded, int32_t* workspace, int32_t* sorted_pair_ids,
                                int32_t* block_expert_ids, int32_t* num_padded, cudaStream_t stream);
cudaError_t launch_align_tokens(const int32_t* ids, int64_t n_pairs, int64_t num_experts, int64_t block_m,
                                int64_t max_padded, int32_t* workspace, int32_t* sorted_pair_ids,
                                int32_t* block_expert_ids, int32_t* num_padded, cudaStream_t stream);

}  // namespace moecap
