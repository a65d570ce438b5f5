// moecap::stream_read: reads every byte of a CPU tensor once, as fast as the memory allows, so that
// calibration measures the read bandwidth a good kernel reaches (torch.sum stops short of it here).
//
// Each thread sums the 64-bit words of one contiguous slice, read as several concurrent streams with
// independent accumulators; the result is returned so that no read can be elided.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace moecap {
namespace {

// Sums n words read as kStreams concurrent sequential streams (one per sub-slice): a core keeps more
// cache-line misses in flight with several streams than with one, which is what fast kernels do.
constexpr int64_t kStreams = 4;

uint64_t sum_words(const uint64_t* words, int64_t n) {
  const int64_t per_stream = n / kStreams / 8 * 8;
  uint64_t acc[kStreams][8] = {};
  for (int64_t i = 0; i < per_stream; i += 8) {
    for (int64_t s = 0; s < kStreams; ++s) {
      const uint64_t* p = words + s * per_stream + i;
      for (int j = 0; j < 8; ++j) acc[s][j] += p[j];
    }
  }
  uint64_t total = 0;
  for (int64_t i = kStreams * per_stream; i < n; ++i) total += words[i];
  for (auto& lanes : acc) {
    for (uint64_t a : lanes) total += a;
  }
  return total;
}

int64_t stream_read(const at::Tensor& buffer) {
  TORCH_CHECK(buffer.device().is_cpu(), "stream_read: needs a CPU tensor");
  TORCH_CHECK(buffer.is_contiguous(), "stream_read: needs a contiguous tensor");
  const int64_t bytes = buffer.numel() * static_cast<int64_t>(buffer.element_size());
  const int64_t n_words = bytes / 8;
  const auto* words = static_cast<const uint64_t*>(buffer.const_data_ptr());
  uint64_t total = 0;
#ifdef _OPENMP
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t begin = n_words * t / nt, end = n_words * (t + 1) / nt;
    total += sum_words(words + begin, end - begin);
  }
#else
  total = sum_words(words, n_words);
#endif
  int64_t result;
  std::memcpy(&result, &total, sizeof(result));
  return result;
}

}  // namespace
}  // namespace moecap

TORCH_LIBRARY_FRAGMENT(moecap, m) { m.def("stream_read(Tensor buffer) -> int"); }

TORCH_LIBRARY_IMPL(moecap, CPU, m) { m.impl("stream_read", &moecap::stream_read); }
