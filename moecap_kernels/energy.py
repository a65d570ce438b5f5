"""Energy, measured by the hardware's own counters: NVML's total-energy counter on an NVIDIA GPU,
RAPL (``/sys/class/powercap``) on a CPU; where neither can be read, no figure and the reason.

Nothing here estimates: a TDP multiplied by a time is not a measurement, and is never returned. A
counter is read before and after a loop of forwards that spans at least ``MIN_SECONDS`` (NVML
updates its counter every 20–100 ms, RAPL every ~1 ms), so one update's granularity is at most a
tenth of the figure. RAPL's counters wrap at ``max_energy_range_uj``; a reading below the one before
means one wrap. Two wraps cannot be told from none: a loop must end before the package has drawn a
whole range (thousands of joules at least; seconds for a loop sized to ``MIN_SECONDS``).

What the counters see is the whole package (and DRAM) or the whole GPU: idle power, and anything
else running on the machine, included. The figures say so in their ``scope``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

MIN_SECONDS = 1.0
POWERCAP = Path("/sys/class/powercap")


class Counter(Protocol):
    """A cumulative energy counter: ``read()`` in joules; ``wrap_joules`` its range (None: no wrap)."""

    name: str
    wrap_joules: float | None

    def read(self) -> float: ...


def joules_between(start: float, end: float, wrap_joules: float | None) -> float:
    """Energy between two readings of a counter that wraps at ``wrap_joules`` (once at most)."""
    if end >= start:
        return end - start
    if wrap_joules is None:
        raise ValueError(f"energy counter went backwards ({start} J → {end} J) and does not wrap")
    return end + wrap_joules - start


@dataclass(frozen=True)
class EnergyReading:
    """Energy of ``forwards`` forwards of ``tokens`` tokens each, over ``seconds`` of wall time."""

    joules: float
    seconds: float
    forwards: int
    tokens: int
    source: str  # which counters: "RAPL: package-0, dram" / "NVML total energy, GPU 0"
    scope: str  # what they include
    domains: dict[str, float] = field(default_factory=dict)  # joules per counter
    device_state: dict[str, float] = field(default_factory=dict)  # e.g. NVML power and clocks at the end

    @property
    def joules_per_forward(self) -> float:
        return self.joules / self.forwards

    @property
    def joules_per_token(self) -> float:
        return self.joules / (self.forwards * self.tokens)

    @property
    def average_power_w(self) -> float:
        return self.joules / self.seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "joules_per_token": self.joules_per_token,
            "joules_per_forward": self.joules_per_forward,
            "average_power_w": self.average_power_w,
            "joules": self.joules,
            "seconds": self.seconds,
            "forwards": self.forwards,
            "source": self.source,
            "scope": self.scope,
            "domains_joules": dict(self.domains),
            "device_state": dict(self.device_state),
            "measured": True,
        }


@dataclass
class EnergyMeter:
    """Several counters read together (a CPU's packages and DRAM), and what they cover."""

    counters: list[Counter]
    source: str
    scope: str
    state: Callable[[], dict[str, float]] = dict  # device facts read at the end of a loop

    def snapshot(self) -> list[float]:
        return [c.read() for c in self.counters]

    def joules_since(self, start: list[float]) -> dict[str, float]:
        return {
            c.name: joules_between(s, c.read(), c.wrap_joules)
            for c, s in zip(self.counters, start, strict=True)
        }


# --- RAPL ------------------------------------------------------------------------------------


def read_microjoules(path: Path) -> int:
    return int(path.read_text().strip())


@dataclass
class RaplCounter:
    """One RAPL zone: ``energy_uj``, wrapping at ``max_energy_range_uj``."""

    name: str
    path: Path
    wrap_joules: float | None

    def read(self) -> float:
        return read_microjoules(self.path / "energy_uj") / 1e6


def _zone_name(zone: Path) -> str:
    try:
        return (zone / "name").read_text().strip()
    except OSError:
        return ""


def rapl_meter(root: Path = POWERCAP) -> tuple[EnergyMeter | None, str]:
    """(a meter of every RAPL package zone and DRAM zone under ``root``, "") or (None, why not).

    Package zones are the top-level ``intel-rapl:N`` (also AMD's, under the same driver); ``core`` and
    ``uncore`` sub-zones lie inside a package and are not added again; ``psys`` covers the platform
    and would count the packages twice.
    """
    if not root.is_dir():
        return None, f"no RAPL counters: {root} is absent (a virtual machine, or no powercap driver)"
    counters: list[RaplCounter] = []
    for zone in sorted(root.glob("intel-rapl:*")):  # not intel-rapl-mmio: it repeats package-0
        name = _zone_name(zone)
        top_level = zone.name.count(":") == 1
        if not ((top_level and name.startswith("package")) or name == "dram"):
            continue
        try:
            wrap = read_microjoules(zone / "max_energy_range_uj") / 1e6
        except (OSError, ValueError):
            wrap = None
        label = name if not any(c.name == name for c in counters) else f"{name} ({zone.name})"
        counters.append(RaplCounter(label, zone, wrap))
    if not counters:
        return None, f"no RAPL package or DRAM zone under {root}"
    meter = EnergyMeter(
        list(counters),
        "RAPL: " + ", ".join(c.name for c in counters),
        "whole CPU package(s)"
        + (" and DRAM" if any(c.name.startswith("dram") for c in counters) else "")
        + ", idle power and every other process included",
    )
    try:
        meter.snapshot()
    except PermissionError:
        return None, f"RAPL counters under {root} are not readable by this user (energy_uj is root-only)"
    except (OSError, ValueError) as exc:
        return None, f"RAPL counters under {root} could not be read ({exc})"
    return meter, ""


# --- NVML ------------------------------------------------------------------------------------


@dataclass
class NvmlCounter:
    """NVML's total energy since the driver loaded (mJ, 64-bit: it does not wrap)."""

    name: str
    nvml: Any
    handle: Any
    wrap_joules: float | None = None

    def read(self) -> float:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3


def _nvml_state(nvml: Any, handle: Any) -> dict[str, float]:
    """Power draw and clocks now; what NVML cannot say is left out."""
    reads = {
        "power_w": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
        "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
        "memory_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
    }
    state = {}
    for key, read in reads.items():
        try:
            state[key] = float(read())
        except Exception:  # an NVML call a GPU does not support: the fact is a nicety
            continue
    return state


def pci_bus_id(index: int) -> str:
    """The PCI address NVML knows CUDA device ``index`` by (CUDA_VISIBLE_DEVICES renumbers the
    devices torch sees; the address does not change)."""
    props = torch.cuda.get_device_properties(index)
    return f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"


def nvml_meter(
    device: torch.device, nvml: Any = None, bus_id: Callable[[int], str] = pci_bus_id
) -> tuple[EnergyMeter | None, str]:
    """(a meter of the GPU's NVML total-energy counter, "") or (None, why not)."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return None, "NVML is not installed (pip install nvidia-ml-py)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        nvml.nvmlInit()
        handle = nvml.nvmlDeviceGetHandleByPciBusId(bus_id(index))
        counter = NvmlCounter(f"GPU {index}", nvml, handle)
        counter.read()
    except Exception as exc:  # NVMLError_NotSupported (pre-Volta), no driver access, …
        return None, f"NVML gives no total energy for cuda:{index} ({exc})"
    meter = EnergyMeter(
        [counter],
        f"NVML total energy, GPU {index}",
        "the whole GPU board, idle power and other processes on it included",
        state=lambda: _nvml_state(nvml, handle),
    )
    return meter, ""


def energy_meter(device: torch.device) -> tuple[EnergyMeter | None, str]:
    """The counters for ``device``: NVML on CUDA, RAPL on a CPU; else (None, the reason).
    ``MOECAP_NO_ENERGY=1`` turns them off for every process (the test suite's rows would each add
    a second's loop on a machine with readable counters)."""
    if os.environ.get("MOECAP_NO_ENERGY", "").strip() not in ("", "0"):
        return None, "not measured (MOECAP_NO_ENERGY is set)"
    if device.type == "cuda":
        return nvml_meter(device)
    return rapl_meter()


# --- measuring -------------------------------------------------------------------------------


def measure_energy(
    run: Callable[[int], object],
    meter: EnergyMeter,
    device: torch.device,
    tokens: int,
    seconds_per_forward: float,
    min_seconds: float | None = None,
) -> EnergyReading:
    """Run ``run(i)`` back to back until the loop spans ``min_seconds``, between two counter reads.

    ``seconds_per_forward`` (the timed median) sizes the first batch of forwards; the device is
    synchronised only between batches, so a GPU's queue stays full.
    """
    min_seconds = MIN_SECONDS if min_seconds is None else min_seconds
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    start_counts, start = meter.snapshot(), time.perf_counter()
    forwards, elapsed = 0, 0.0
    batch = max(1, math.ceil(min_seconds / max(seconds_per_forward, 1e-9)))
    while True:
        for _ in range(batch):
            run(forwards)
            forwards += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            break
        batch = max(1, math.ceil((min_seconds - elapsed) / (elapsed / forwards)))
    domains = meter.joules_since(start_counts)
    return EnergyReading(
        joules=sum(domains.values()),
        seconds=elapsed,
        forwards=forwards,
        tokens=tokens,
        source=meter.source,
        scope=meter.scope,
        domains=domains,
        device_state=meter.state(),
    )
