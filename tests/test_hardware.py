"""Datasheet matching, peak precedence, the calibration cache and a quick CPU calibration."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moecap_kernels import _ext, files
from moecap_kernels import hardware as hw
from moecap_kernels._ext import load_extension
from moecap_kernels.errors import UserError

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
    entry = hw.datasheet_entry(name)
    assert entry is not None and entry.key == key


@pytest.mark.parametrize("name", UNKNOWN_NAMES)
def test_near_misses_do_not_match(name: str) -> None:
    assert hw.datasheet_entry(name) is None


def test_every_entry_is_complete_and_plausible() -> None:
    entries = hw.DATASHEET
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


def test_every_entry_matches_its_own_display_name() -> None:
    for e in hw.DATASHEET:
        found = hw.datasheet_entry(e.name)
        assert found is not None and found.key == e.key, e.name


def test_format_datasheet_lists_every_entry() -> None:
    text = hw.format_datasheet()
    assert all(e.name in text for e in hw.DATASHEET)


# ----------------------------------------------------------------------------- precedence


def _info(kind: str = "cuda", name: str = "NVIDIA H200", machine_id: str = "abc123") -> hw.DeviceInfo:
    return hw.DeviceInfo(kind, name, 141 * 2**30, 140 * 2**30, 60 * 2**20, 132, machine_id)


def _calibration(machine_id: str = "abc123", **kw: object) -> hw.Calibration:
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
    )
    return replace(base, **kw)


def _resolve(
    info: hw.DeviceInfo,
    dtype: str,
    calibration: hw.Calibration | None = None,
    bandwidth: float | None = None,
    flops: float | None = None,
    **kw: bool,
) -> hw.Peaks:
    """resolve_peaks with positional shorthands for the three optional sources."""
    return hw.resolve_peaks(
        info, dtype, calibration=calibration, peak_bandwidth=bandwidth, peak_flops=flops, **kw
    )


def test_datasheet_beats_calibration_on_a_known_gpu() -> None:
    peaks = _resolve(_info(), "bf16", _calibration())
    assert peaks.bandwidth_bytes_per_s == 4.8e12 and peaks.flops_per_s == pytest.approx(989.4e12)
    assert peaks.source == "datasheet: NVIDIA H200 SXM" and peaks.dtype == "bfloat16"
    assert peaks.ridge_point == pytest.approx(989.4e12 / 4.8e12)


def test_user_overrides_beat_everything_per_figure() -> None:
    peaks = _resolve(_info(), "float32", _calibration(), 3e12)
    assert peaks.bandwidth_bytes_per_s == 3e12 and peaks.bandwidth_source == "user: --peak-bandwidth"
    assert peaks.flops_per_s == pytest.approx(66.9e12) and peaks.flops_source == "datasheet: NVIDIA H200 SXM"
    assert "user: --peak-bandwidth" in peaks.source and "datasheet" in peaks.source
    both = _resolve(_info(), "float32", None, 1e12, 2e13)
    assert (both.bandwidth_bytes_per_s, both.flops_per_s) == (1e12, 2e13)
    assert both.flops_source == "user: --peak-flops"


def test_calibration_fills_in_for_an_unknown_gpu() -> None:
    info = _info(name="NVIDIA GH200 480GB")
    peaks = _resolve(info, "bfloat16", _calibration())
    assert (peaks.bandwidth_bytes_per_s, peaks.flops_per_s) == (4.0e12, 7.0e14)
    assert peaks.source == "measured: calibration 2026-11-29"


def test_prefer_measured_lets_calibration_beat_the_datasheet() -> None:
    peaks = _resolve(_info(), "bfloat16", _calibration(), prefer_measured=True)
    assert peaks.bandwidth_bytes_per_s == 4.0e12 and peaks.source.startswith("measured")


def test_cpu_uses_calibration_even_if_its_name_looks_known() -> None:
    info = _info(kind="cpu", name="NVIDIA H200")  # a CPU never gets datasheet peaks
    cal = replace(_calibration(), kind="cpu", from_cache=True)
    peaks = _resolve(info, "float32", cal)
    assert peaks.flops_per_s == 5.0e13 and peaks.source == "measured: calibration 2026-11-29 (cached)"


def test_slow_path_is_named_in_the_flops_source() -> None:
    cal = replace(
        _calibration(),
        gemm_flops_per_s={"float16": 3e9},
        gemm_sizes={"float16": 256},
        gemm_notes={"float16": "slow path"},
    )
    peaks = _resolve(_info(kind="cpu"), "fp16", cal)
    assert "slow path" in peaks.flops_source and "slow path" not in peaks.bandwidth_source


def test_unknown_gpu_without_calibration_is_a_one_line_user_error() -> None:
    with pytest.raises(UserError) as err:
        _resolve(_info(name="NVIDIA H800"), "bf16")
    message = str(err.value)
    assert "\n" not in message and "unknown device" in message
    assert "--calibrate" in message and "--peak-bandwidth" in message and "--peak-flops" in message


def test_missing_dtype_in_calibration_is_a_user_error() -> None:
    with pytest.raises(UserError, match="float16"):
        _resolve(_info(kind="cpu"), "float16", _calibration())


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_bad_overrides_are_rejected(bad: float) -> None:
    with pytest.raises(UserError):
        _resolve(_info(), "bf16", None, bad)
    with pytest.raises(UserError):
        _resolve(_info(), "bf16", None, None, bad)


def test_calibration_from_another_machine_is_refused() -> None:
    with pytest.raises(ValueError, match="machine"):
        _resolve(_info(), "bf16", _calibration("other"))


def test_peaks_reject_non_positive_figures() -> None:
    with pytest.raises(ValueError):
        hw.Peaks(0.0, 1.0, "float32", "a", "b")


# ----------------------------------------------------------------------------- detection and cache


def test_detect_cpu() -> None:
    info = hw.detect_device(torch.device("cpu"))
    assert info.kind == "cpu" and info.name and info.cores >= 1
    assert 0 < info.memory_available_bytes <= info.memory_total_bytes
    assert info.llc_bytes >= 2**20
    assert len(info.machine_id) == 12 and info.machine_id == hw.detect_device("cpu").machine_id


def test_machine_id_is_stable_and_discriminating() -> None:
    a = hw.machine_id_for("cuda", "NVIDIA H200", 132, 150_000_000_000)
    assert a == hw.machine_id_for("cuda", "NVIDIA H200", 132, 150_000_100_000)  # rounding to GiB
    assert a != hw.machine_id_for("cuda", "NVIDIA H100 80GB HBM3", 132, 150_000_000_000)
    assert a != hw.machine_id_for("cuda", "NVIDIA H200", 114, 150_000_000_000)


def test_llc_falls_back_when_sysfs_is_missing(tmp_path: Path) -> None:
    assert hw._cpu_llc_bytes(tmp_path / "nope") == hw.FALLBACK_LLC_BYTES
    for i, (level, size) in enumerate([(1, "48K"), (2, "1024K"), (3, "32768K")]):
        (tmp_path / f"index{i}").mkdir()
        (tmp_path / f"index{i}" / "level").write_text(f"{level}\n")
        (tmp_path / f"index{i}" / "size").write_text(f"{size}\n")
    assert hw._cpu_llc_bytes(tmp_path) == 32 * 2**20


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    load_extension()  # built (or found) in the real cache first: calibration uses its stream_read
    monkeypatch.setenv("MOECAP_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_cache_round_trip(cache_dir: Path) -> None:
    info = _info()
    assert hw.load_cached_calibration(info) is None
    cal = replace(_calibration(), gemm_notes={"float32": "slow path"}, quick=True, duration_s=1.5)
    path = hw.save_calibration(cal, info)
    assert path.parent == cache_dir and path.name.startswith(f"calibration-{info.machine_id}-")
    loaded = hw.load_cached_calibration(info)
    assert loaded == cal and loaded is not None and loaded.from_cache
    assert json.loads(path.read_text())["torch_version"] == torch.__version__
    assert [p.name for p in cache_dir.iterdir()] == [path.name]  # no temp files left behind


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{not json",
        "[]",
        '{"schema": 1}',
        '{"schema": 999}',
    ],
)
def test_malformed_cache_reads_as_none(cache_dir: Path, text: str) -> None:
    info = _info()
    hw.cache_path(info).write_text(text)
    assert hw.load_cached_calibration(info) is None


def test_cache_with_bad_figures_or_other_machine_reads_as_none(cache_dir: Path) -> None:
    info = _info()
    path = hw.save_calibration(_calibration(), info)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "read_bandwidth_bytes_per_s": -5}))
    assert hw.load_cached_calibration(info) is None
    path.write_text(json.dumps({**data, "gemm_flops_per_s": {"int8": 1e12}}))
    assert hw.load_cached_calibration(info) is None
    path.write_text(json.dumps({**data, "machine_id": "someone-else"}))
    assert hw.load_cached_calibration(info) is None


def test_calibration_json_lists_every_field_but_from_cache() -> None:
    data = replace(_calibration(), from_cache=True).to_json()
    assert list(data) == [
        "schema",
        "machine_id",
        "device_name",
        "kind",
        "torch_version",
        "threads",
        "date",
        "read_bandwidth_bytes_per_s",
        "copy_bandwidth_bytes_per_s",
        "gemm_flops_per_s",
        "gemm_sizes",
        "gemm_notes",
        "duration_s",
        "quick",
    ]
    assert data["schema"] == hw.CACHE_SCHEMA and data["gemm_sizes"] == {"bfloat16": 8192, "float32": 8192}
    assert hw.Calibration.from_json(data) == _calibration()


def test_calibrations_and_builds_share_one_cache_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MOECAP_CACHE_DIR > XDG_CACHE_HOME/moecap_kernels > ~/.cache/moecap_kernels, for both."""
    info = _info()
    monkeypatch.delenv("MOECAP_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "moecap_kernels"
    assert hw.cache_path(info).parent == _ext.cache_root() == expected
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hw.cache_path(info).parent == _ext.cache_root() == tmp_path / "xdg" / "moecap_kernels"
    monkeypatch.setenv("MOECAP_CACHE_DIR", str(tmp_path / "mine"))
    assert hw.cache_path(info).parent == _ext.cache_root() == tmp_path / "mine"


def test_failed_write_leaves_no_temp_file(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        hw.save_calibration(_calibration(), _info())
    assert list(cache_dir.iterdir()) == []


# ----------------------------------------------------------------------------- measuring


def test_quick_cpu_calibration_is_plausible_and_cached(cache_dir: Path) -> None:
    cal = hw.calibrate(torch.device("cpu"), ["float32", "bf16"], quick=True)
    assert not cal.from_cache and cal.quick and cal.kind == "cpu"
    assert 1e9 < cal.read_bandwidth_bytes_per_s < 1e13
    assert 1e9 < cal.copy_bandwidth_bytes_per_s < 1e13
    assert set(cal.gemm_flops_per_s) == {"float32", "bfloat16"}
    assert all(1e8 < f < 1e14 for f in cal.gemm_flops_per_s.values())
    assert 0 < cal.duration_s < 10
    again = hw.calibrate("cpu", ["bfloat16"], quick=True)
    assert again.from_cache and again == cal
    info = hw.detect_device("cpu")
    peaks = _resolve(info, "float32", again)
    assert peaks.bandwidth_source.endswith("(cached)") and "(cached)" in peaks.flops_source


def test_copy_buffer_size_counts_source_and_destination(monkeypatch: pytest.MonkeyPatch) -> None:
    info = replace(_info(), memory_available_bytes=2**30)
    one, two = hw._bandwidth_buffer_bytes(info, 8), hw._bandwidth_buffer_bytes(info, 8, buffers=2)
    assert (one, two) == (2**28, 2**27)  # a quarter of free memory, shared by the buffers
    asked: list[int] = []

    def spy(info: hw.DeviceInfo, multiple: int, buffers: int = 1) -> int:
        asked.append(buffers)
        return 2**20

    monkeypatch.setattr(hw, "_bandwidth_buffer_bytes", spy)
    plan = hw._Plan((8,), 1, 1, 1, 0.1, 128, (128,))
    read_bw, copy_bw = hw._measure_bandwidth(torch.device("cpu"), hw.detect_device("cpu"), plan)
    assert asked == [1, 2] and read_bw > 0 and copy_bw > 0  # one read buffer; copy's src and dst


def test_cpu_gemm_budget_flags_a_slow_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GEMM that is slow at every size stops early and is noted, within its time budget."""
    real = torch.matmul

    def slow_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        time.sleep(a.shape[0] ** 3 * 2e-9)  # 2e-9·n³ s for 2n³ FLOP: 1 GFLOP/s
        return real(a, b)

    monkeypatch.setattr(hw.torch, "matmul", slow_matmul)
    plan = hw._Plan((8,), 1, 3, 2, 0.3, 2048, (4096,))
    flops, n, note = hw._cpu_gemm_peak("float32", plan)
    assert n < hw.SLOW_GEMM_N and note.startswith("slow path") and 1e8 < flops < 2e9
