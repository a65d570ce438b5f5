"""A DeviceInfo and a Calibration to build tests on (no measuring)."""

from __future__ import annotations

from dataclasses import replace

import torch

from moecap_kernels import hardware as hw


def fake_info(kind: str = "cuda", name: str = "NVIDIA H200", machine_id: str = "abc123") -> hw.DeviceInfo:
    return hw.DeviceInfo(kind, name, 141 * 2**30, 140 * 2**30, 60 * 2**20, 132, machine_id)


def fake_calibration(machine_id: str = "abc123", **kw: object) -> hw.Calibration:
    base = hw.Calibration(
        machine_id=machine_id,
        device_name="test device",
        kind="cuda",
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        date="2026-11-29T10:00:00+00:00",
        read_bandwidth_bytes_per_s=4.0e12,
        copy_bandwidth_bytes_per_s=3.5e12,
        gemm_flops_per_s={"bfloat16": 7.0e14, "float32": 5.0e13},
        gemm_sizes={"bfloat16": 8192, "float32": 8192},
        read_bandwidth_spread=0.02,
        copy_bandwidth_spread=0.01,
        gemm_spreads={"bfloat16": 0.03, "float32": 0.0},
        others_cpu_share=0.01,
    )
    return replace(base, **kw)
