"""The CuPy/NVRTC path of the csrc CUDA kernels, checked without a GPU: the kernel headers are
device code alone (nvcc compiles each on its own; NVRTC needs no host header), the names CuPy asks
for exist, and the Python launch geometry is the C++ launcher's. tests/test_gpu.py runs the kernels."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from moecap_kernels import cupy_kernels
from moecap_kernels._ext import CSRC_DIR

HEADERS = ("counts_kernels.cuh", "align_kernels.cuh")


@pytest.mark.parametrize("name", HEADERS)
def test_a_kernel_header_is_device_code_nvrtc_can_take(name):
    text = (CSRC_DIR / name).read_text()
    assert re.findall(r"#include\s*[<\"]([^>\"]+)[>\"]", text) == ["device_types.cuh"]
    assert "cudaError_t" not in text and "<<<" not in text  # no host launch code


def test_the_device_types_need_no_header_under_nvrtc():
    text = (CSRC_DIR / "device_types.cuh").read_text()
    rtc, host = text[text.index("#if defined(__CUDACC_RTC__)") : text.index("#endif")].split("#else")
    assert "typedef long long int64_t;" in rtc and "typedef int int32_t;" in rtc and "#include" not in rtc
    assert re.findall(r"#include\s*<([^>]+)>", host) == ["cstdint"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
@pytest.mark.parametrize("name", HEADERS)
def test_nvcc_compiles_each_header_alone(tmp_path, name):
    unit = tmp_path / "k.cu"
    unit.write_text(f'#include "{CSRC_DIR / name}"\n')  # the header and nothing else
    done = subprocess.run(
        ["nvcc", "-arch=sm_90", "-c", str(unit), "-o", str(tmp_path / "k.o")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr.lower()


def test_every_name_cupy_asks_for_is_defined():
    text = cupy_kernels.source()
    for name in cupy_kernels.NAMES.values():
        function = name.split("::")[-1].split("<")[0]
        assert re.search(rf"\b{function}\(", text), name
        namespace = name.split("::")[1]
        assert f"namespace {namespace} {{" in text


def _cpp_constant(name: str) -> int:
    header = (CSRC_DIR / "align_cuda.h").read_text()
    return int(re.search(rf"constexpr int64_t {name} = (\d+);", header)[1])


def test_launch_geometry_is_the_cpp_launchers():
    assert _cpp_constant("kAlignChunkPairs") == cupy_kernels.ALIGN_CHUNK_PAIRS
    assert _cpp_constant("kAlignMaxChunks") == cupy_kernels.ALIGN_MAX_CHUNKS
    assert _cpp_constant("kAlignChunkGranule") == cupy_kernels.ALIGN_CHUNK_GRANULE
    kernels = (CSRC_DIR / "align_kernels.cuh").read_text()
    assert f"constexpr int kThreads = {cupy_kernels.ALIGN_THREADS};" in kernels
    assert f"constexpr int kScanThreads = {cupy_kernels.SCAN_THREADS};" in kernels
    counts = (CSRC_DIR / "counts_kernels.cuh").read_text()
    assert f"constexpr int kThreads = {cupy_kernels.COUNT_THREADS};" in counts
    for n_pairs, expected in ((0, 4096), (4096, 4096), (4096 * 1024, 4096), (4096 * 1024 + 1, 4352)):
        assert cupy_kernels.chunk_pairs(n_pairs) == expected  # spread over ≤ 1024 chunks, whole 256s
    assert cupy_kernels.grid_size(3, 10) == 3 and cupy_kernels.grid_size(1, 10**9) == 4096


def test_without_cupy_or_a_gpu_the_path_says_why():
    if cupy_kernels.available():
        pytest.skip("CuPy and a GPU are here: tests/test_gpu.py covers the path")
    assert cupy_kernels.status() in ("CuPy not installed", "CuPy sees no GPU")
