"""Which figure divides: the two denominators of S-MBU and S-MFU for one dtype, and where each came from.

Precedence per figure (``resolve_peaks``): a user override (``--peak-bandwidth`` /
``--peak-flops``), then on CUDA the vendor datasheet when the device name is in the table, then a
measured calibration (so a CPU or an unknown GPU still gets honest peaks). Every figure must lie in
the plausible ranges of ``limits``; a ratio against an impossible peak would be an impossible ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

from moecap_kernels.dtypes import canonical_compute_dtype
from moecap_kernels.errors import UserError
from moecap_kernels.hardware.calibration import Calibration
from moecap_kernels.hardware.datasheet import datasheet_entry
from moecap_kernels.hardware.device import DeviceInfo
from moecap_kernels.limits import PLAUSIBLE_BANDWIDTH, PLAUSIBLE_FLOPS, implausible


@dataclass(frozen=True)
class Peaks:
    """The two denominators for one dtype, each with where it came from and, when measured, the
    spread of its trials; ``caveat`` says why they are not to be trusted (empty when they are)."""

    bandwidth_bytes_per_s: float
    flops_per_s: float
    dtype: str
    bandwidth_source: str
    flops_source: str
    bandwidth_spread: float | None = None
    flops_spread: float | None = None
    caveat: str = ""

    def __post_init__(self) -> None:
        for label, value, bounds, unit in (
            ("peak bandwidth", self.bandwidth_bytes_per_s, PLAUSIBLE_BANDWIDTH, "B/s"),
            ("peak FLOP rate", self.flops_per_s, PLAUSIBLE_FLOPS, "FLOP/s"),
        ):
            problem = implausible(label, value, bounds, unit)
            if problem:
                raise ValueError(problem)

    @property
    def source(self) -> str:
        """One line naming both sources, collapsed when they agree."""
        if self.bandwidth_source == self.flops_source:
            return self.bandwidth_source
        return f"bandwidth {self.bandwidth_source}; flops {self.flops_source}"

    @property
    def ridge_point(self) -> float:
        """FLOP per byte at which the roofline turns from memory- to compute-bound."""
        return self.flops_per_s / self.bandwidth_bytes_per_s


def check_override(flag: str, value: float | None, bounds: tuple[float, float], unit: str) -> float | None:
    """``value`` as a float when it is plausible (or None when not given), else a one-line UserError."""
    if value is None:
        return None
    problem = implausible(flag, value, bounds, unit)
    if problem:
        raise UserError(problem)
    return float(value)


def resolve_peaks(
    info: DeviceInfo,
    dtype: str,
    *,
    calibration: Calibration | None,
    peak_bandwidth: float | None,
    peak_flops: float | None,
    prefer_measured: bool = False,
) -> Peaks:
    """Pick each denominator: user override > datasheet (CUDA, known name) > measured calibration.

    ``prefer_measured`` (the CLI's ``--calibrate``) lets a calibration beat the datasheet. On CPU
    there is no datasheet: the calibration is the default. A calibration measured on another
    machine is a caller bug (ValueError). Missing figures raise a one-line UserError.
    """
    dtype = canonical_compute_dtype(dtype)
    peak_bandwidth = check_override("--peak-bandwidth", peak_bandwidth, PLAUSIBLE_BANDWIDTH, "B/s")
    peak_flops = check_override("--peak-flops", peak_flops, PLAUSIBLE_FLOPS, "FLOP/s")
    if calibration is not None and calibration.machine_id != info.machine_id:
        raise ValueError(f"calibration is for machine {calibration.machine_id}, not {info.machine_id}")
    entry = datasheet_entry(info.name) if info.kind == "cuda" else None
    if prefer_measured and calibration is not None:
        entry = None

    # (figure, source, spread of its trials or None when not measured)
    bandwidth: tuple[float, str, float | None] | None = None
    flops: tuple[float, str, float | None] | None = None
    if peak_bandwidth is not None:
        bandwidth = (peak_bandwidth, "user: --peak-bandwidth", None)
    elif entry is not None:
        bandwidth = (entry.bandwidth_bytes_per_s, f"datasheet: {entry.name}", None)
    elif calibration is not None:
        bandwidth = (
            calibration.read_bandwidth_bytes_per_s,
            calibration.label,
            calibration.read_bandwidth_spread,
        )
    if peak_flops is not None:
        flops = (peak_flops, "user: --peak-flops", None)
    elif entry is not None and entry.peak_flops(dtype) is not None:
        flops = (entry.peak_flops(dtype), f"datasheet: {entry.name}", None)
    elif calibration is not None and dtype in calibration.gemm_flops_per_s:
        slow = f" ({dtype} GEMM on a slow path)" if dtype in calibration.gemm_notes else ""
        flops = (
            calibration.gemm_flops_per_s[dtype],
            calibration.label + slow,
            calibration.gemm_spreads.get(dtype),
        )

    if bandwidth is None or flops is None:
        raise UserError(_missing_peaks_message(info, dtype, bandwidth is None, flops is None))
    measured = bandwidth[2] is not None or flops[2] is not None
    reason = calibration.unstable_reason if calibration is not None and measured else None
    caveat = f"calibration unstable: {reason}; not cached" if reason else ""
    return Peaks(bandwidth[0], flops[0], dtype, bandwidth[1], flops[1], bandwidth[2], flops[2], caveat)


def _missing_peaks_message(info: DeviceInfo, dtype: str, no_bandwidth: bool, no_flops: bool) -> str:
    missing = " and ".join(
        label for label, gone in (("bandwidth", no_bandwidth), (f"{dtype} FLOP/s", no_flops)) if gone
    )
    what = "unknown device" if info.kind == "cuda" else "device"
    return (
        f"{what} {info.name!r} has no datasheet entry and no calibration giving its peak {missing}; "
        "pass --calibrate or --peak-bandwidth/--peak-flops"
    )
