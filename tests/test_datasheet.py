"""The datasheet as data: every entry complete and plausible, and device names matched to the right one."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from moecap_kernels.hardware import datasheet as ds

# Strings as torch.cuda.get_device_name() / nvidia-smi / rocm report them → expected datasheet key.
KNOWN_NAMES = [
    ("NVIDIA A100-PCIE-40GB", "a100-40gb-pcie"),
    ("NVIDIA A100 80GB PCIe", "a100-80gb-pcie"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb-sxm"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb-sxm"),
    ("NVIDIA A100-SXM-80GB", "a100-80gb-sxm"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("NVIDIA H100 SXM5 80GB", "h100-sxm"),
    ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200-sxm"),
    ("NVIDIA H200 NVL", "h200-nvl"),
    ("NVIDIA H20", "h20"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA L40", "l40"),
    ("NVIDIA L4", "l4"),
    ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("NVIDIA GeForce RTX 5090", "rtx-5090"),
    ("NVIDIA B200", "b200"),
    ("AMD Instinct MI300X", "mi300x"),
    ("AMD Instinct MI300X VF", "mi300x"),
    ("  nvidia h100 80gb hbm3 ", "h100-sxm"),  # case and spacing do not matter
]

# Near misses: other SKUs, partitions and mobile parts must not borrow a datasheet's peaks.
UNKNOWN_NAMES = [
    "NVIDIA GH200 480GB",  # contains H200
    "NVIDIA GB200",  # contains B200
    "NVIDIA H800",
    "NVIDIA H100",  # PCIe or SXM? ambiguous, so unknown
    "NVIDIA H100 80GB HBM3 MIG 1g.10gb",  # a MIG slice
    "NVIDIA A100",  # ambiguous
    "NVIDIA A10",
    "NVIDIA A10G",
    "NVIDIA A40",
    "NVIDIA L40G",
    "NVIDIA GeForce RTX 4090 D",
    "NVIDIA GeForce RTX 4090 Laptop GPU",
    "NVIDIA GeForce RTX 5090 D",
    "NVIDIA GeForce RTX 4080",
    "NVIDIA RTX 6000 Ada Generation",
    "Tesla T4",
    "AMD Instinct MI300A",
    "AMD Instinct MI325X",
    "AMD EPYC 9654 96-Core Processor",
    "",
]


@pytest.mark.parametrize(("name", "key"), KNOWN_NAMES)
def test_known_names_match_the_right_entry(name: str, key: str) -> None:
    entry = ds.datasheet_entry(name)
    assert entry is not None and entry.key == key


@pytest.mark.parametrize("name", UNKNOWN_NAMES)
def test_near_misses_do_not_match(name: str) -> None:
    assert ds.datasheet_entry(name) is None


def test_every_entry_is_complete_and_plausible() -> None:
    entries = ds.datasheet_entries()
    assert len(entries) >= 12
    assert len({e.key for e in entries}) == len(entries)
    for e in entries:
        assert e.source and e.url.startswith("https://") and e.note, e.key
        assert 1e11 <= e.bandwidth_bytes_per_s <= 2e13, e.key
        assert 8 <= e.memory_gb <= 512, e.key
        for dtype in ("bfloat16", "float16", "float32"):
            assert 1e12 <= e.peak_flops(dtype) <= 1e16, (e.key, dtype)
        assert e.bf16_flops >= e.fp32_flops and e.fp16_flops >= e.fp32_flops, e.key
        assert e.tf32_flops is None or e.fp32_flops <= e.tf32_flops <= e.bf16_flops, e.key
        assert e.peak_flops("bf16") == e.bf16_flops


def test_the_json_is_read_in_vendor_units() -> None:
    """TB/s and TFLOP/s in the file, bytes/s and FLOP/s in the entries: H200 SXM is 4.8 TB/s, 989.4 TF."""
    raw = json.loads((resources.files("moecap_kernels.hardware") / "datasheet.json").read_text())
    keys = [e["key"] for e in raw["entries"]]
    assert keys == [e.key for e in ds.datasheet_entries()]  # table order is matching order
    h200 = next(e for e in ds.datasheet_entries() if e.key == "h200-sxm")
    figures = (h200.bandwidth_bytes_per_s, h200.bf16_flops, h200.fp32_flops)
    assert figures == pytest.approx((4.8e12, 989.4e12, 66.9e12), rel=1e-12)
    assert "dense" in raw["about"].lower()


def test_every_entry_matches_its_own_display_name() -> None:
    for e in ds.datasheet_entries():
        found = ds.datasheet_entry(e.name)
        assert found is not None and found.key == e.key, e.name


def test_format_datasheet_lists_every_entry() -> None:
    text = ds.format_datasheet()
    assert all(e.name in text for e in ds.datasheet_entries())
