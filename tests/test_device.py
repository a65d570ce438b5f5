"""Device detection: CPU facts from /proc and /sys, the machine id that keys the calibration cache."""

from __future__ import annotations

from pathlib import Path

import torch

from moecap_kernels.hardware import device


def test_detect_cpu() -> None:
    info = device.detect_device(torch.device("cpu"))
    assert info.kind == "cpu" and info.name and info.cores >= 1
    assert 0 < info.memory_available_bytes <= info.memory_total_bytes
    assert info.llc_bytes >= 2**20
    assert len(info.machine_id) == 12 and info.machine_id == device.detect_device("cpu").machine_id


def test_machine_id_is_stable_and_discriminating() -> None:
    a = device.machine_id_for("cuda", "NVIDIA H200", 132, 150_000_000_000)
    assert a == device.machine_id_for("cuda", "NVIDIA H200", 132, 150_000_100_000)  # rounding to GiB
    assert a != device.machine_id_for("cuda", "NVIDIA H100 80GB HBM3", 132, 150_000_000_000)
    assert a != device.machine_id_for("cuda", "NVIDIA H200", 114, 150_000_000_000)


def test_llc_falls_back_when_sysfs_is_missing(tmp_path: Path) -> None:
    assert device.cpu_llc_bytes(tmp_path / "nope") == device.FALLBACK_LLC_BYTES
    for i, (level, size) in enumerate([(1, "48K"), (2, "1024K"), (3, "32768K")]):
        (tmp_path / f"index{i}").mkdir()
        (tmp_path / f"index{i}" / "level").write_text(f"{level}\n")
        (tmp_path / f"index{i}" / "size").write_text(f"{size}\n")
    assert device.cpu_llc_bytes(tmp_path) == 32 * 2**20
