"""Hardware peaks: the denominators of S-MBU and S-MFU.

Three sources, in this order of precedence per figure (see ``resolve_peaks``):

1. a user override (``--peak-bandwidth`` / ``--peak-flops``);
2. on CUDA devices, the vendor datasheet when the device name is in our table;
3. a measured calibration: streaming read bandwidth and dense GEMM throughput, timed with torch
   on this very machine and cached as JSON, so a CPU or an unknown GPU still gets honest peaks.

Datasheet figures are *dense* (never the 2:4-sparsity number). bf16/fp16 are tensor-core rates
with FP32 accumulation (what torch.matmul uses); float32 is the non-tensor FP32 rate, TF32 is
listed apart. Bandwidths are decimal bytes/s (1 TB/s = 1e12).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import math
import os
import platform
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from moecap_kernels._ext import cache_root
from moecap_kernels.dtypes import TORCH_DTYPES, canonical_dtype
from moecap_kernels.errors import UserError
from moecap_kernels.files import write_atomic
from moecap_kernels.timing import TimingStats, time_region

T = 1e12  # tera
P = 1e15  # peta
GB_S = 1e9  # decimal GB/s, as vendors quote bandwidth

CACHE_SCHEMA = 1
FALLBACK_LLC_BYTES = 32 * 2**20


# --------------------------------------------------------------------------------------------
# Datasheet table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasheetEntry:
    """Vendor peaks for one accelerator SKU, and how to recognise its reported name.

    ``match``: regexes that must *all* be found in the normalised device name (upper case,
    ``-``/``_`` turned into spaces); ``exclude``: regexes of which none may be found. Entries
    are tried in table order, so a more specific SKU sits before the generic one.
    """

    key: str
    name: str
    match: tuple[str, ...]
    bandwidth_bytes_per_s: float
    memory_gb: float  # vendor's nominal capacity ("80GB" on HBM parts is 80 GiB)
    bf16_flops: float
    fp16_flops: float
    fp32_flops: float
    source: str
    url: str
    tf32_flops: float | None = None
    exclude: tuple[str, ...] = ()
    note: str = ""  # what we could and could not verify, and any caveat

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype`` (canonical or alias name)."""
        key = canonical_dtype(dtype)
        return {"bfloat16": self.bf16_flops, "float16": self.fp16_flops, "float32": self.fp32_flops}[key]

    def matches(self, normalized_name: str) -> bool:
        return all(re.search(p, normalized_name) for p in self.match) and not any(
            re.search(p, normalized_name) for p in self.exclude
        )


_A100_DS = (
    "NVIDIA A100 Tensor Core GPU datasheet",
    "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
    "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
)
_H100_DS = (
    "NVIDIA H100 Tensor Core GPU datasheet",
    "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet",
)
_H200_DS = ("NVIDIA H200 Tensor Core GPU datasheet", "https://www.nvidia.com/en-us/data-center/h200/")
_L40_DS = ("NVIDIA L40 / L40S datasheets", "https://www.nvidia.com/en-us/data-center/l40s/")
_ADA_WP = (
    "NVIDIA Ada Lovelace GPU Architecture whitepaper (Appendix A, GeForce RTX 4090)",
    "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf",
)
_RTX_BW_WP = (
    "NVIDIA RTX Blackwell GPU Architecture whitepaper (GeForce RTX 5090)",
    "https://images.nvidia.com/aem-dam/Solutions/geforce/blackwell/nvidia-rtx-blackwell-gpu-architecture.pdf",
)

# Positional fields: key, name, match, bandwidth B/s, memory GB, bf16, fp16, fp32 FLOP/s, source, url.
# Word boundaries keep H20 off H200, H200 off GH200, B200 off GB200 and L4 off L40/L40S.
DATASHEET: tuple[DatasheetEntry, ...] = (
    # --- Hopper: NVL and PCIe before the SXM entry, which wants SXM/HBM3/80GB in the name ---
    DatasheetEntry(
        "h100-nvl",
        "NVIDIA H100 NVL",
        (r"\bH100\b", r"\bNVL\b"),
        3.9e12,
        94,
        835.5 * T,
        835.5 * T,
        60 * T,
        *_H100_DS,
        tf32_flops=417.5 * T,
        note="94GB/3.9TB/s verified (third-party); FP32 60 and BF16 1,671 sparse from memory of the "
        "datasheet, not verified here",
    ),
    DatasheetEntry(
        "h100-pcie",
        "NVIDIA H100 PCIe",
        (r"\bH100\b", r"\bPCIE\b"),
        2.0e12,
        80,
        756.5 * T,
        756.5 * T,
        51.2 * T,
        *_H100_DS,
        tf32_flops=378 * T,
        note="verified: 2,000GB/s, FP32 51, BF16 1,513 sparse (datasheet table reproduced by hpctech.co.jp)",
    ),
    DatasheetEntry(
        "h100-sxm",
        "NVIDIA H100 SXM",
        (r"\bH100\b", r"\bSXM\d*\b|\bHBM3\b|\b80 ?GB\b"),
        3.35e12,
        80,
        989.4 * T,
        989.4 * T,
        66.9 * T,
        *_H100_DS,
        tf32_flops=494.7 * T,
        note="verified: 3.35TB/s, FP32 67, BF16 1,979 sparse (hpctech.co.jp; glennklockwood.com)",
    ),
    DatasheetEntry(
        "h200-nvl",
        "NVIDIA H200 NVL",
        (r"\bH200\b", r"\bNVL\b"),
        4.8e12,
        141,
        835.5 * T,
        835.5 * T,
        60 * T,
        *_H200_DS,
        tf32_flops=417.5 * T,
        note="141GB/4.8TB/s verified (aiwiki.ai); FP32 60 and BF16 1,671 sparse not verified here",
    ),
    DatasheetEntry(
        "h200-sxm",
        "NVIDIA H200 SXM",
        (r"\bH200\b",),
        4.8e12,
        141,
        989.4 * T,
        989.4 * T,
        66.9 * T,
        *_H200_DS,
        tf32_flops=494.7 * T,
        note="verified: 141GB, 4.8TB/s, BF16 ~989 dense (itkb.uw.cz, aiminingco.com); FP32 as H100 SXM "
        "(same GH100 SXM configuration)",
    ),
    DatasheetEntry(
        "h20",
        "NVIDIA H20",
        (r"\bH20\b",),
        4.0e12,
        96,
        148 * T,
        148 * T,
        44 * T,
        "NVIDIA H20 specifications (no public NVIDIA datasheet)",
        "https://willitrunai.com/es/gpus/h20-96gb",
        tf32_flops=74 * T,
        note="verified only against third-party pages (96GB, 4.0TB/s, FP16 148 dense, FP32 44, TF32 74); "
        "a 141GB H20 variant may report the same name",
    ),
    # --- Ampere A100: PCIe before SXM, 80GB before 40GB ---
    DatasheetEntry(
        "a100-80gb-pcie",
        "NVIDIA A100 80GB PCIe",
        (r"\bA100\b", r"\bPCIE\b", r"\b80 ?GB\b"),
        1.935e12,
        80,
        312 * T,
        312 * T,
        19.5 * T,
        *_A100_DS,
        tf32_flops=156 * T,
        note="verified: 1,935GB/s (thundercompute.com), 312/19.5 TFLOPS",
    ),
    DatasheetEntry(
        "a100-40gb-pcie",
        "NVIDIA A100 40GB PCIe",
        (r"\bA100\b", r"\bPCIE\b"),
        1.555e12,
        40,
        312 * T,
        312 * T,
        19.5 * T,
        *_A100_DS,
        tf32_flops=156 * T,
        note="verified: 1,555GB/s, 312 BF16 dense, 19.5 FP32 (glennklockwood.com citing the datasheet)",
    ),
    DatasheetEntry(
        "a100-80gb-sxm",
        "NVIDIA A100 80GB SXM",
        (r"\bA100\b", r"\b80 ?GB\b"),
        2.039e12,
        80,
        312 * T,
        312 * T,
        19.5 * T,
        *_A100_DS,
        tf32_flops=156 * T,
        note="verified: 2,039GB/s, 312 BF16 dense, 19.5 FP32 (glennklockwood.com citing the datasheet)",
    ),
    DatasheetEntry(
        "a100-40gb-sxm",
        "NVIDIA A100 40GB SXM",
        (r"\bA100\b", r"\bSXM\d*\b|\b40 ?GB\b"),
        1.555e12,
        40,
        312 * T,
        312 * T,
        19.5 * T,
        *_A100_DS,
        tf32_flops=156 * T,
        note="verified: 1,555GB/s, 312/19.5 TFLOPS",
    ),
    # --- Ada data centre: L40S before L40 before L4 (each guarded by \b anyway) ---
    DatasheetEntry(
        "l40s",
        "NVIDIA L40S",
        (r"\bL40S\b",),
        864 * GB_S,
        48,
        362.05 * T,
        362.05 * T,
        91.6 * T,
        *_L40_DS,
        tf32_flops=183 * T,
        note="verified: 864GB/s, FP32 91.6, BF16 362.05 dense / 733 sparse (datasheet table reproduced "
        "by mullet.se)",
    ),
    DatasheetEntry(
        "l40",
        "NVIDIA L40",
        (r"\bL40\b",),
        864 * GB_S,
        48,
        181.05 * T,
        181.05 * T,
        90.5 * T,
        *_L40_DS,
        tf32_flops=90.5 * T,
        note="verified: 864GB/s, FP32 90.5, BF16 181.05 dense (same table)",
    ),
    DatasheetEntry(
        "l4",
        "NVIDIA L4",
        (r"\bL4\b",),
        300 * GB_S,
        24,
        121 * T,
        121 * T,
        30.3 * T,
        "NVIDIA L4 Tensor Core GPU datasheet",
        "https://www.nvidia.com/en-us/data-center/l4/",
        tf32_flops=60 * T,
        note="verified: 300GB/s, FP16 242 sparse (grokipedia), FP32 30.3 (fpsbench), TF32 120 sparse",
    ),
    # --- GeForce: FP16/BF16 with FP32 accumulate run at half the FP16-accumulate rate ---
    DatasheetEntry(
        "rtx-5090",
        "NVIDIA GeForce RTX 5090",
        (r"\bRTX 5090\b",),
        1792 * GB_S,
        32,
        209.5 * T,
        209.5 * T,
        104.8 * T,
        *_RTX_BW_WP,
        tf32_flops=104.8 * T,
        exclude=(r"\bRTX 5090 D\b",),
        note="verified: 1,792GB/s, FP32 ~104.8, FP16 838 sparse with FP16 accumulate; the FP32-accumulate "
        "dense rate 209.5 assumes GeForce half rate as on Ada and is not verified here",
    ),
    DatasheetEntry(
        "rtx-4090",
        "NVIDIA GeForce RTX 4090",
        (r"\bRTX 4090\b",),
        1008 * GB_S,
        24,
        165.2 * T,
        165.2 * T,
        82.6 * T,
        *_ADA_WP,
        tf32_flops=82.6 * T,
        exclude=(r"\bRTX 4090 D\b",),
        note="verified: 1,008GB/s, FP32 82.6, FP16/BF16 tensor with FP32 accumulate 165.2 dense "
        "(hmc-tech.com, waredb.com)",
    ),
    # --- Blackwell data centre: \bB200 does not match GB200 ---
    DatasheetEntry(
        "b200",
        "NVIDIA B200 (HGX)",
        (r"\bB200\b",),
        7.7e12,
        180,
        2.25 * P,
        2.25 * P,
        75 * T,
        "NVIDIA HGX B200 datasheet (per-GPU figures)",
        "https://www.nvidia.com/en-us/data-center/hgx/",
        tf32_flops=1.1 * P,
        note="verified: 180GB, 7.7TB/s, BF16 4.5PF sparse, FP32 75 (HGX datasheet table reproduced by "
        "zdszero.github.io); older DGX B200 material quotes 8TB/s and FP32 80",
    ),
    # --- AMD CDNA 3 (ROCm torch reports it through torch.cuda) ---
    DatasheetEntry(
        "mi300x",
        "AMD Instinct MI300X",
        (r"\bMI300X\b",),
        5.3e12,
        192,
        1307.4 * T,
        1307.4 * T,
        163.4 * T,
        "AMD Instinct MI300X data sheet",
        "https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html",
        tf32_flops=653.7 * T,
        note="verified: 192GB, 5.3TB/s, BF16 1,307.4 dense (github alpharomercoma/MI300X-vs-H200, "
        "codesota.com); FP32 vector 163.4 not verified here (one third-party page says 164.6)",
    ),
)

# Names that never get datasheet peaks: a MIG slice or a mobile part has a fraction of the SKU's.
_NEVER_MATCH = (r"\bMIG\b", r"\bLAPTOP\b", r"\bMOBILE\b", r"\bMAX Q\b")


def normalize_device_name(name: str) -> str:
    """Upper-case ``name`` with ``-``/``_`` as spaces and single spacing, for regex matching."""
    return re.sub(r"\s+", " ", re.sub(r"[-_]", " ", name)).strip().upper()


def datasheet_entry(name: str) -> DatasheetEntry | None:
    """The first table entry whose patterns match ``name`` (as torch or NVML reports it), else None."""
    norm = normalize_device_name(name)
    if not norm or any(re.search(p, norm) for p in _NEVER_MATCH):
        return None
    return next((e for e in DATASHEET if e.matches(norm)), None)


def format_datasheet() -> str:
    """A plain-text table of the datasheet for a ``--list-devices`` printout."""
    head = f"{'device':<26} {'mem GB':>6} {'BW TB/s':>8} {'BF16 TF':>8} {'FP16 TF':>8} {'FP32 TF':>8}  source"
    rows = [head, "-" * len(head)]
    for e in DATASHEET:
        rows.append(
            f"{e.name:<26} {e.memory_gb:>6g} {e.bandwidth_bytes_per_s / T:>8.3f} {e.bf16_flops / T:>8.1f} "
            f"{e.fp16_flops / T:>8.1f} {e.fp32_flops / T:>8.1f}  {e.source}"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Peaks
# --------------------------------------------------------------------------------------------


def _is_positive_finite(value: float) -> bool:
    return math.isfinite(value) and value > 0


@dataclass(frozen=True)
class Peaks:
    """The two denominators for one dtype, each with where it came from."""

    bandwidth_bytes_per_s: float
    flops_per_s: float
    dtype: str
    bandwidth_source: str
    flops_source: str

    def __post_init__(self) -> None:
        for label, value in (("bandwidth", self.bandwidth_bytes_per_s), ("flops", self.flops_per_s)):
            if not _is_positive_finite(value):
                raise ValueError(f"peak {label} must be positive and finite, got {value!r}")

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


# --------------------------------------------------------------------------------------------
# Device detection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """What we know of the device a profile runs on; ``machine_id`` keys the calibration cache."""

    kind: str  # "cpu" | "cuda"
    name: str
    memory_total_bytes: int
    memory_available_bytes: int
    llc_bytes: int  # last-level cache: L2 on a GPU, the highest cache level on a CPU
    cores: int  # usable CPU cores, or streaming multiprocessors
    machine_id: str


def machine_id_for(kind: str, name: str, cores: int, memory_total_bytes: int) -> str:
    """Stable 12-hex-digit id; memory is rounded to GiB so small reporting drifts don't change it."""
    key = f"{kind}|{name}|{cores}|{round(memory_total_bytes / 2**30)}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def detect_device(device: torch.device | str) -> DeviceInfo:
    """Describe ``device`` (CPU from /proc and /sys, CUDA from torch, NVML only as a name fallback)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _detect_cuda(device)
    if device.type == "cpu":
        return _detect_cpu()
    raise UserError(f"unsupported device type {device.type!r}; use cpu or cuda")


def _detect_cpu() -> DeviceInfo:
    name = _cpu_model_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    total, available = _cpu_memory()
    return DeviceInfo(
        "cpu", name, total, available, _cpu_llc_bytes(), cores, machine_id_for("cpu", name, cores, total)
    )


def _cpu_model_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _meminfo_kib() -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key.strip()] = int(parts[0])
    return out


def _cpu_memory() -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes, with sysconf as the fallback."""
    info = _meminfo_kib()
    page = _sysconf("SC_PAGE_SIZE") or 4096
    total = info["MemTotal"] * 1024 if "MemTotal" in info else (_sysconf("SC_PHYS_PAGES") or 0) * page
    if "MemAvailable" in info:
        available = info["MemAvailable"] * 1024
    else:
        available = (_sysconf("SC_AVPHYS_PAGES") or 0) * page or total
    return total, available


def _sysconf(name: str) -> int | None:
    try:
        value = os.sysconf(name)
    except (ValueError, OSError, AttributeError):
        return None
    return value if value > 0 else None


def _parse_cache_size(text: str) -> int | None:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        return None
    return int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2).upper()]


def _cpu_llc_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """Size of cpu0's highest cache level (largest if several), or 32 MiB when sysfs is silent."""
    best: tuple[int, int] | None = None
    for index in sorted(root.glob("index*")):
        try:
            level = int((index / "level").read_text())
            size = _parse_cache_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if size and (best is None or (level, size) > best):
            best = (level, size)
    return best[1] if best else FALLBACK_LLC_BYTES


def _detect_cuda(device: torch.device) -> DeviceInfo:
    if not torch.cuda.is_available():
        raise UserError("CUDA device requested but torch.cuda is not available on this machine")
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    name = props.name or _nvml_name(props) or f"cuda:{index}"
    free, total = torch.cuda.mem_get_info(index)
    llc = int(getattr(props, "L2_cache_size", 0) or 0) or FALLBACK_LLC_BYTES
    cores = int(props.multi_processor_count)
    return DeviceInfo(
        "cuda", name, int(total), int(free), llc, cores, machine_id_for("cuda", name, cores, int(total))
    )


def _nvml_name(props: Any) -> str | None:
    """The NVML name of the GPU with ``props``' PCI address; None if pynvml is absent or fails."""
    try:
        import pynvml  # optional dependency
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByPciBusId(bus))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML errors, missing attributes: the name is a nicety, never required
        return None
    return name.decode() if isinstance(name, bytes) else str(name)


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Measured peaks of one machine under one torch version and thread count."""

    machine_id: str
    device_name: str
    kind: str
    torch_version: str
    threads: int
    date: str  # ISO 8601, UTC
    read_bandwidth_bytes_per_s: float
    copy_bandwidth_bytes_per_s: float  # counts read + write bytes, as STREAM does
    gemm_flops_per_s: Mapping[str, float]
    gemm_sizes: Mapping[str, int]  # the n of the n×n×n GEMM that gave each figure
    gemm_notes: Mapping[str, str] = field(default_factory=dict)  # dtypes cut short by the time limit
    duration_s: float = 0.0
    quick: bool = False
    from_cache: bool = field(default=False, compare=False)

    @property
    def label(self) -> str:
        """Source text used in Peaks, e.g. ``measured: calibration 2026-11-29 (cached)``."""
        return f"measured: calibration {self.date[:10]}" + (" (cached)" if self.from_cache else "")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["from_cache"]
        return {"schema": CACHE_SCHEMA, **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        """Parse and validate; raises ValueError/KeyError/TypeError on anything malformed."""
        if data.get("schema") != CACHE_SCHEMA:
            raise ValueError(f"unknown calibration schema {data.get('schema')!r}")
        flops = {canonical_dtype(k): _positive(v) for k, v in dict(data["gemm_flops_per_s"]).items()}
        sizes = {canonical_dtype(k): int(v) for k, v in dict(data["gemm_sizes"]).items()}
        notes = {canonical_dtype(k): str(v) for k, v in dict(data.get("gemm_notes", {})).items()}
        return cls(
            machine_id=str(data["machine_id"]),
            device_name=str(data["device_name"]),
            kind=str(data["kind"]),
            torch_version=str(data["torch_version"]),
            threads=int(data["threads"]),
            date=str(data["date"]),
            read_bandwidth_bytes_per_s=_positive(data["read_bandwidth_bytes_per_s"]),
            copy_bandwidth_bytes_per_s=_positive(data["copy_bandwidth_bytes_per_s"]),
            gemm_flops_per_s=flops,
            gemm_sizes=sizes,
            gemm_notes=notes,
            duration_s=float(data.get("duration_s", 0.0)),
            quick=bool(data.get("quick", False)),
        )


def _positive(value: Any) -> float:
    out = float(value)
    if not _is_positive_finite(out):
        raise ValueError(f"expected a positive finite number, got {value!r}")
    return out


def cache_path(info: DeviceInfo, torch_version: str | None = None) -> Path:
    """Where the calibration of ``info`` under this (or the given) torch version lives."""
    version = re.sub(r"[^A-Za-z0-9._-]", "_", torch_version or torch.__version__)
    return cache_root() / f"calibration-{info.machine_id}-{version}.json"


def load_cached_calibration(info: DeviceInfo) -> Calibration | None:
    """The cached calibration for this machine and torch version; None if absent or malformed."""
    try:
        data = json.loads(cache_path(info).read_text())
        cal = Calibration.from_json(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError):
        return None
    if cal.machine_id != info.machine_id or cal.torch_version != torch.__version__:
        return None
    return replace(cal, from_cache=True)


def save_calibration(cal: Calibration, info: DeviceInfo) -> Path:
    """Write ``cal`` atomically (temp file in the same folder, then os.replace); return the path."""
    path = cache_path(info, cal.torch_version)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(cal.to_json(), indent=2, sort_keys=True) + "\n")
    return path


def calibrate(
    device: torch.device | str,
    dtypes: Sequence[str],
    *,
    force: bool = False,
    quick: bool = False,
) -> Calibration:
    """Measured read/copy bandwidth and dense GEMM peaks for ``dtypes`` on ``device``.

    Reuses the cache unless ``force``, the cache lacks a dtype, the thread count changed, or a
    full run was asked for and only a quick one is cached. The cost is bounded by the plan
    (``_QUICK`` or ``_FULL``): a few bandwidth repetitions, then a fixed GEMM time budget per CPU
    dtype, so a slow GEMM path (float16 on most CPUs) is measured at smaller sizes and flagged in
    ``gemm_notes`` rather than waited on.
    """
    device = torch.device(device)
    wanted = [canonical_dtype(d) for d in dtypes]
    info = detect_device(device)
    if not force:
        cached = load_cached_calibration(info)
        if cached is not None and _cache_covers(cached, wanted, quick, device):
            return cached
    cal = _measure(device, info, wanted, quick)
    try:
        save_calibration(cal, info)
    except OSError as exc:  # a read-only home must not stop a profile
        warnings.warn(f"could not cache the calibration: {exc}", RuntimeWarning, stacklevel=2)
    return cal


def _cache_covers(cal: Calibration, wanted: Sequence[str], quick: bool, device: torch.device) -> bool:
    if any(d not in cal.gemm_flops_per_s for d in wanted):
        return False
    if cal.quick and not quick:
        return False
    return device.type != "cpu" or cal.threads == torch.get_num_threads()


@dataclass(frozen=True)
class _Plan:
    """How hard to measure: sizes, repetitions and the per-dtype time budget."""

    bw_multiples: tuple[int, ...]  # buffer sizes as multiples of the LLC
    cpu_placements: int  # buffers of each size read on a CPU (the fastest counts)
    bw_reps: int
    gemm_reps: int
    cpu_gemm_budget_s: float
    cpu_gemm_max_n: int
    cuda_gemm_sizes: tuple[int, ...]


# A CPU GEMM that cannot reach this n within its budget is flagged as a slow path.
SLOW_GEMM_N = 1024

_FULL = _Plan((8, 16), 3, 10, 3, 2.0, 4096, (4096, 8192))
_QUICK = _Plan((8,), 2, 5, 2, 0.8, 2048, (4096,))


def _measure(device: torch.device, info: DeviceInfo, dtypes: Sequence[str], quick: bool) -> Calibration:
    plan = _QUICK if quick else _FULL
    start = time.perf_counter()
    read_bw, copy_bw = _measure_bandwidth(device, info, plan)
    flops: dict[str, float] = {}
    sizes: dict[str, int] = {}
    notes: dict[str, str] = {}
    for dtype in dtypes:
        if device.type == "cuda":
            flops[dtype], sizes[dtype] = _cuda_gemm_peak(device, dtype, plan)
        else:
            flops[dtype], sizes[dtype], note = _cpu_gemm_peak(dtype, plan)
            if note:
                notes[dtype] = note
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Calibration(
        machine_id=info.machine_id,
        device_name=info.name,
        kind=info.kind,
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        read_bandwidth_bytes_per_s=read_bw,
        copy_bandwidth_bytes_per_s=copy_bw,
        gemm_flops_per_s=flops,
        gemm_sizes=sizes,
        gemm_notes=notes,
        duration_s=round(time.perf_counter() - start, 3),
        quick=quick,
    )


def _per_call(
    fn: Callable[[], object], device: torch.device, *, reps: int, inner: int = 1, warmup: int = 0
) -> TimingStats:
    """Seconds per call of ``fn``, one sample per timed group of ``inner`` back-to-back calls.

    ``warmup`` untimed calls first; then ``timing.time_region`` times ``reps`` groups
    (perf_counter, or CUDA events read after the last group) and each sample is divided by ``inner``.
    """
    for _ in range(warmup):
        fn()

    def group(_: int) -> None:
        for _ in range(inner):
            fn()

    stats = time_region(group, device, warmup=0, reps=reps)
    return TimingStats(tuple(t / inner for t in stats.samples_s), stats.method)


def _bandwidth_buffer_bytes(info: DeviceInfo, multiple: int, buffers: int = 1) -> int:
    """A streaming buffer of ``multiple`` × LLC (at least 256 MiB on GPUs); ``buffers`` of them
    together take at most 1/4 of free memory."""
    want = multiple * info.llc_bytes
    if info.kind == "cuda":
        want = max(want, 256 * 2**20)
    cap = max(info.memory_available_bytes // (4 * buffers), 16 * 2**20)
    return max(min(want, cap) // 4096 * 4096, 4096)


def _measure_bandwidth(device: torch.device, info: DeviceInfo, plan: _Plan) -> tuple[float, float]:
    """(read, copy) bytes/s: best over buffer sizes of the median over repetitions.

    Read is the faster of a float32 ``sum`` and, on a CPU, the extension's ``stream_read`` (several
    concurrent streams per core, as fast kernels read; torch's sum stops short of that); both read
    every byte once and write nothing. Copy is ``dst.copy_(src)`` counted as 2 × bytes, on the
    smallest buffer to bound memory use.
    """
    inner = 10 if device.type == "cuda" else 1
    readers = [lambda buf: buf.sum]
    if device.type == "cpu":
        from moecap_kernels._ext import has_op

        if has_op("stream_read", "cpu"):
            readers.append(lambda buf: functools.partial(torch.ops.moecap.stream_read, buf))
    read_best = 0.0
    # On a CPU the figure depends on where a buffer's pages land (one allocation can read much
    # slower than another on the same machine: benchmarks/results/compare-2026-11-29-amd-epyc.md
    # records a calibrated 81.8 GB/s beside 46.0 GB/s for a torch sum of a fresh 1 GiB buffer in
    # the same run), so several buffers live at once and the fastest counts: the ceiling a kernel
    # whose data landed well reaches.
    placements = plan.cpu_placements if device.type == "cpu" else 1
    for multiple in plan.bw_multiples:
        nbytes = _bandwidth_buffer_bytes(info, multiple, placements)
        # Random data, never constant: pages of identical bytes can be merged by the host (KSM) and
        # then read from cache, which inflates the figure.
        bufs = [torch.rand(nbytes // 4, dtype=torch.float32, device=device) for _ in range(placements)]
        for buf in bufs:
            for reader in readers:
                stats = _per_call(reader(buf), device, reps=plan.bw_reps, inner=inner, warmup=1)
                read_best = max(read_best, nbytes / stats.median)
        del bufs
    nbytes = _bandwidth_buffer_bytes(info, plan.bw_multiples[0], buffers=2)  # src and dst
    src = torch.rand(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy = _per_call(lambda: dst.copy_(src), device, reps=plan.bw_reps, inner=inner, warmup=1)
    copy_bw = 2 * nbytes / copy.median
    return read_best, copy_bw


def _gemm_operands(n: int, dtype: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randn(n, n, device=device, dtype=TORCH_DTYPES[dtype])
    return a, torch.randn(n, n, device=device, dtype=TORCH_DTYPES[dtype])


def _cpu_gemm_peak(dtype: str, plan: _Plan) -> tuple[float, int, str]:
    """(best FLOP/s, n it was reached at, note) over square GEMMs n = 128, 256, … within a time budget.

    Each step predicts the next size's cost (8× the median time of this one); when that would
    overrun the budget the search stops. Stopping below ``SLOW_GEMM_N`` marks a slow path
    (float16 on most CPUs), noted so the figure is not mistaken for a real peak.
    """
    cpu = torch.device("cpu")
    deadline = time.perf_counter() + plan.cpu_gemm_budget_s
    n, best, best_n = 128, 0.0, 128
    while True:
        matmul = functools.partial(torch.matmul, *_gemm_operands(n, dtype, cpu))
        stats = _per_call(matmul, cpu, reps=plan.gemm_reps)  # no warm-up: every call counts
        flop = 2 * n**3
        if flop / min(stats.samples_s) > best:
            best, best_n = flop / min(stats.samples_s), n
        next_cost = plan.gemm_reps * 8 * stats.median
        if 2 * n <= plan.cpu_gemm_max_n and time.perf_counter() + next_cost <= deadline:
            n *= 2
            continue
        note = _slow_note(n, flop / stats.median) if n < SLOW_GEMM_N else ""
        return best, best_n, note


def _slow_note(n: int, rate: float) -> str:
    return (
        f"slow path: the time budget stopped the search at n={n} ({rate / 1e9:.3g} GFLOP/s there); "
        "this dtype has no fast GEMM on this device"
    )


@contextlib.contextmanager
def _ieee_fp32_matmul() -> Iterator[None]:
    """Measure true FP32 (no TF32) and restore the caller's setting afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _cuda_gemm_peak(device: torch.device, dtype: str, plan: _Plan) -> tuple[float, int]:
    """(best FLOP/s, n) over large square GEMMs, timed with CUDA events, best of a few trials."""
    best, best_n = 0.0, plan.cuda_gemm_sizes[0]
    with _ieee_fp32_matmul():
        for n in plan.cuda_gemm_sizes:
            a, b = _gemm_operands(n, dtype, device)
            out = torch.empty_like(a)
            fn = functools.partial(torch.matmul, a, b, out=out)
            # one warm-up call (cuBLAS handle and heuristics); time_region synchronises after it
            stats = _per_call(fn, device, reps=max(plan.gemm_reps, 3), inner=5, warmup=1)
            per_call = min(stats.samples_s)
            rate = 2 * n**3 / per_call
            if rate > best:
                best, best_n = rate, n
            del a, b, out
    return best, best_n


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


def _check_override(label: str, value: float | None) -> float | None:
    if value is None:
        return None
    if not _is_positive_finite(value):
        raise UserError(f"--peak-{label} must be a positive number, got {value!r}")
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
    dtype = canonical_dtype(dtype)
    peak_bandwidth = _check_override("bandwidth", peak_bandwidth)
    peak_flops = _check_override("flops", peak_flops)
    if calibration is not None and calibration.machine_id != info.machine_id:
        raise ValueError(f"calibration is for machine {calibration.machine_id}, not {info.machine_id}")
    entry = datasheet_entry(info.name) if info.kind == "cuda" else None
    if prefer_measured and calibration is not None:
        entry = None

    bandwidth: tuple[float, str] | None = None
    flops: tuple[float, str] | None = None
    if peak_bandwidth is not None:
        bandwidth = (peak_bandwidth, "user: --peak-bandwidth")
    elif entry is not None:
        bandwidth = (entry.bandwidth_bytes_per_s, f"datasheet: {entry.name}")
    elif calibration is not None:
        bandwidth = (calibration.read_bandwidth_bytes_per_s, calibration.label)
    if peak_flops is not None:
        flops = (peak_flops, "user: --peak-flops")
    elif entry is not None:
        flops = (entry.peak_flops(dtype), f"datasheet: {entry.name}")
    elif calibration is not None and dtype in calibration.gemm_flops_per_s:
        slow = f" ({dtype} GEMM on a slow path)" if dtype in calibration.gemm_notes else ""
        flops = (calibration.gemm_flops_per_s[dtype], calibration.label + slow)

    if bandwidth is None or flops is None:
        raise UserError(_missing_peaks_message(info, dtype, bandwidth is None, flops is None))
    return Peaks(bandwidth[0], flops[0], dtype, bandwidth[1], flops[1])


def _missing_peaks_message(info: DeviceInfo, dtype: str, no_bandwidth: bool, no_flops: bool) -> str:
    missing = " and ".join(
        label for label, gone in (("bandwidth", no_bandwidth), (f"{dtype} FLOP/s", no_flops)) if gone
    )
    what = "unknown device" if info.kind == "cuda" else "device"
    return (
        f"{what} {info.name!r} has no datasheet entry and no calibration giving its peak {missing}; "
        "pass --calibrate or --peak-bandwidth/--peak-flops"
    )
