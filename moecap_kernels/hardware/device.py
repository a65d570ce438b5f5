"""What a profile runs on: the device's name, memory, last-level cache and cores, and the id that
keys its calibration cache. CPU facts come from /proc and /sys, CUDA facts from torch (NVML only as
a name fallback).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moecap_kernels.errors import UserError

FALLBACK_LLC_BYTES = 32 * 2**20


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
        "cpu", name, total, available, cpu_llc_bytes(), cores, machine_id_for("cpu", name, cores, total)
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


def cpu_llc_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
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
