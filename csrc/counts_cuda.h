// Launcher for the CUDA routing counter. Plain C++ (no torch headers) so that the
// .cu file builds with nvcc alone and the .cpp side stays light.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace moecap {

// Largest number of experts the single-block shared-memory histogram supports
// (4 bytes per expert; 64K experts = 256 KiB exceeds every GPU, the real limit is
// the device's opt-in shared memory, checked by the launcher).
constexpr int64_t kMaxCountExperts = 1 << 16;

// Adds the counts of one forward's routing to `stats` (int64 [E + 6], device memory),
// see csrc/counts.cpp for the layout. `ids` holds `n_pairs` int64 expert ids in device
// memory. Enqueued on `stream`; never synchronises the host. Returns the launch error.
cudaError_t launch_count_routing(const int64_t* ids, int64_t n_pairs, int64_t num_experts,
                                 int64_t expert_weight_bytes, int64_t expert_flops_per_pair,
                                 int64_t* stats, cudaStream_t stream);

}  // namespace moecap
