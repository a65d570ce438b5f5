"""Which figure divides: override > datasheet > calibration, per figure; implausible figures refused."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from moecap_kernels import hardware as hw
from moecap_kernels.errors import UserError
from tests.hardware_fakes import fake_calibration, fake_info


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
    peaks = _resolve(fake_info(), "bf16", fake_calibration())
    assert peaks.bandwidth_bytes_per_s == 4.8e12 and peaks.flops_per_s == pytest.approx(989.4e12)
    assert peaks.source == "datasheet: NVIDIA H200 SXM" and peaks.dtype == "bfloat16"
    assert peaks.ridge_point == pytest.approx(989.4e12 / 4.8e12)
    assert peaks.bandwidth_spread is None and peaks.flops_spread is None and peaks.caveat == ""


def test_user_overrides_beat_everything_per_figure() -> None:
    peaks = _resolve(fake_info(), "float32", fake_calibration(), 3e12)
    assert peaks.bandwidth_bytes_per_s == 3e12 and peaks.bandwidth_source == "user: --peak-bandwidth"
    assert peaks.flops_per_s == pytest.approx(66.9e12) and peaks.flops_source == "datasheet: NVIDIA H200 SXM"
    assert "user: --peak-bandwidth" in peaks.source and "datasheet" in peaks.source
    both = _resolve(fake_info(), "float32", None, 1e12, 2e13)
    assert (both.bandwidth_bytes_per_s, both.flops_per_s) == (1e12, 2e13)
    assert both.flops_source == "user: --peak-flops"


def test_calibration_fills_in_for_an_unknown_gpu_with_its_spreads() -> None:
    info = fake_info(name="NVIDIA GH200 480GB")
    peaks = _resolve(info, "bfloat16", fake_calibration())
    assert (peaks.bandwidth_bytes_per_s, peaks.flops_per_s) == (4.0e12, 7.0e14)
    assert peaks.source == "measured: calibration 2026-11-29"
    assert (peaks.bandwidth_spread, peaks.flops_spread, peaks.caveat) == (0.02, 0.03, "")


def test_an_unstable_calibration_is_used_with_a_caveat() -> None:
    cal = fake_calibration(others_cpu_share=0.45)
    peaks = _resolve(fake_info(name="NVIDIA GH200"), "bfloat16", cal)
    assert peaks.bandwidth_bytes_per_s == 4.0e12
    assert peaks.caveat.startswith("calibration unstable") and "45%" in peaks.caveat
    # overridden in full, the calibration divides nothing, so it carries no caveat
    assert _resolve(fake_info(), "bfloat16", cal, 1e12, 1e14).caveat == ""


def test_prefer_measured_lets_calibration_beat_the_datasheet() -> None:
    peaks = _resolve(fake_info(), "bfloat16", fake_calibration(), prefer_measured=True)
    assert peaks.bandwidth_bytes_per_s == 4.0e12 and peaks.source.startswith("measured")


def test_cpu_uses_calibration_even_if_its_name_looks_known() -> None:
    info = fake_info(kind="cpu", name="NVIDIA H200")  # a CPU never gets datasheet peaks
    cal = replace(fake_calibration(), kind="cpu", from_cache=True)
    peaks = _resolve(info, "float32", cal)
    assert peaks.flops_per_s == 5.0e13 and peaks.source == "measured: calibration 2026-11-29 (cached)"


def test_slow_path_is_named_in_the_flops_source() -> None:
    cal = fake_calibration(
        gemm_flops_per_s={"float16": 3e9},
        gemm_sizes={"float16": 256},
        gemm_notes={"float16": "slow path"},
        gemm_spreads={"float16": 0.0},
    )
    peaks = _resolve(fake_info(kind="cpu"), "fp16", cal)
    assert "slow path" in peaks.flops_source and "slow path" not in peaks.bandwidth_source


def test_unknown_gpu_without_calibration_is_a_one_line_user_error() -> None:
    with pytest.raises(UserError) as err:
        _resolve(fake_info(name="NVIDIA H800"), "bf16")
    message = str(err.value)
    assert "\n" not in message and "unknown device" in message
    assert "--calibrate" in message and "--peak-bandwidth" in message and "--peak-flops" in message


def test_missing_dtype_in_calibration_is_a_user_error() -> None:
    with pytest.raises(UserError, match="float16"):
        _resolve(fake_info(kind="cpu"), "float16", fake_calibration())


@pytest.mark.parametrize("bad", [0.0, -1.0, 1e-300, 1e30, math.inf, math.nan])
def test_implausible_overrides_are_rejected(bad: float) -> None:
    with pytest.raises(UserError, match=r"--peak-bandwidth .*implausible"):
        _resolve(fake_info(), "bf16", None, bad)
    with pytest.raises(UserError, match=r"--peak-flops .*implausible"):
        _resolve(fake_info(), "bf16", None, None, bad)


def test_calibration_from_another_machine_is_refused() -> None:
    with pytest.raises(ValueError, match="machine"):
        _resolve(fake_info(), "bf16", fake_calibration("other"))


@pytest.mark.parametrize(
    ("bandwidth", "flops"), [(0.0, 1e12), (1e12, -1.0), (1e-300, 1e12), (1e12, math.inf)]
)
def test_peaks_reject_implausible_figures(bandwidth: float, flops: float) -> None:
    with pytest.raises(ValueError, match="implausible"):
        hw.Peaks(bandwidth, flops, "float32", "a", "b")
