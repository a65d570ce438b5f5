// The integer types of the device-only kernel headers (*_kernels.cuh). Those are compiled by nvcc
// into the torch extension (included by the .cu launchers) and, where that extension cannot be built,
// by NVRTC at run time through CuPy (moecap_kernels/cupy_kernels.py). NVRTC has no standard headers,
// hence the typedefs.
#pragma once

#if defined(__CUDACC_RTC__)
typedef long long int64_t;
typedef int int32_t;
#else
#include <cstdint>
#endif
