"""Energy counters: RAPL zones in a fake /sys/class/powercap (wrap-around, domains, unreadable),
NVML through a fake module, the null path with its reason, and the figures in a profile's JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moecap_kernels import energy
from moecap_kernels.energy import joules_between, measure_energy, nvml_meter, rapl_meter
from moecap_kernels.profile import main as profile_main
from tests.helpers import tiny_config

WRAP_UJ = 262_143_328_850  # a typical Intel package's max_energy_range_uj


def _zone(root: Path, name: str, label: str, energy_uj: int, wrap_uj: int | None = WRAP_UJ) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    if wrap_uj is not None:
        (zone / "max_energy_range_uj").write_text(f"{wrap_uj}\n")
    return zone


def _powercap(tmp_path: Path, package_uj: int = 1_000_000, dram_uj: int = 5_000) -> Path:
    """Two packages, core/uncore and DRAM sub-zones, a psys zone and an MMIO copy of package-0."""
    root = tmp_path / "powercap"
    _zone(root, "intel-rapl:0", "package-0", package_uj)
    _zone(root, "intel-rapl:0:0", "core", 777)
    _zone(root, "intel-rapl:0:1", "dram", dram_uj)
    _zone(root, "intel-rapl:1", "package-1", 0)
    _zone(root, "intel-rapl:2", "psys", 0)
    _zone(root, "intel-rapl-mmio:0", "package-0", 0)
    return root


def _add(zone: Path, microjoules: int, wrap_uj: int = WRAP_UJ) -> None:
    path = zone / "energy_uj"
    path.write_text(f"{(int(path.read_text()) + microjoules) % wrap_uj}\n")


def test_wrap_around_is_one_range_added():
    assert joules_between(10.0, 25.5, 100.0) == 15.5
    assert joules_between(95.0, 3.0, 100.0) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="backwards"):
        joules_between(5.0, 4.0, None)


def test_rapl_meter_takes_packages_and_dram_only(tmp_path):
    meter, why = rapl_meter(_powercap(tmp_path))
    assert why == ""
    names = [c.name for c in meter.counters]
    assert names == ["package-0", "dram", "package-1"]  # no core (inside package), psys or MMIO copy
    assert meter.source == "RAPL: package-0, dram, package-1"
    assert "DRAM" in meter.scope and "idle power" in meter.scope


def test_a_loop_across_a_wrap_measures_every_joule(tmp_path):
    root = _powercap(tmp_path, package_uj=WRAP_UJ - 3_000_000)  # package-0 wraps within 2 forwards
    meter, _ = rapl_meter(root)
    calls = []

    def forward(i: int) -> None:  # each forward: 2 J on package-0, 0.25 J on DRAM, 1 J on package-1
        calls.append(i)
        _add(root / "intel-rapl:0", 2_000_000)
        _add(root / "intel-rapl:0:1", 250_000)
        _add(root / "intel-rapl:1", 1_000_000)

    reading = measure_energy(forward, meter, torch.device("cpu"), tokens=4, seconds_per_forward=0.01,
                             min_seconds=0.05)  # fmt: skip
    n = len(calls)
    assert calls == list(range(n)) and n == reading.forwards and n >= 5
    assert reading.seconds >= 0.05
    assert reading.domains["package-0"] == pytest.approx(2.0 * n)
    assert reading.domains["dram"] == pytest.approx(0.25 * n)
    assert reading.joules == pytest.approx(3.25 * n)
    assert reading.joules_per_token == pytest.approx(3.25 / 4)
    assert reading.average_power_w == pytest.approx(3.25 * n / reading.seconds)
    assert reading.to_dict()["measured"] is True


@pytest.mark.parametrize(
    ("setup", "phrase"),
    [
        (lambda root: None, "is absent"),
        (lambda root: _zone(root, "intel-rapl:0", "psys", 0), "no RAPL package or DRAM zone"),
    ],
)
def test_no_counters_give_none_and_the_reason(tmp_path, setup, phrase):
    root = tmp_path / "powercap"
    if phrase != "is absent":
        root.mkdir()
        setup(root)
    meter, why = rapl_meter(root)
    assert meter is None and phrase in why


def test_unreadable_counters_say_so(tmp_path, monkeypatch):
    root = _powercap(tmp_path)

    def denied(path: Path) -> int:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return WRAP_UJ

    monkeypatch.setattr(energy, "read_microjoules", denied)
    meter, why = rapl_meter(root)
    assert meter is None and "not readable by this user" in why


class FakeNvml:
    """The few NVML calls the meter makes; energy advances 1500 mJ per read."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2

    def __init__(self, supported: bool = True) -> None:
        self.millijoules, self.supported, self.bus = 10_000, supported, None

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByPciBusId(self, bus: str) -> str:
        self.bus = bus
        return "handle"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        if not self.supported:
            raise RuntimeError("Not Supported")
        self.millijoules += 1500
        return self.millijoules

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        return 312_000

    def nvmlDeviceGetClockInfo(self, handle: str, which: int) -> int:
        return {1: 1980, 2: 3201}[which]


def test_nvml_counter_in_joules_with_power_and_clocks():
    fake = FakeNvml()
    meter, why = nvml_meter(torch.device("cuda", 1), nvml=fake, bus_id=lambda i: f"0000:0{i}:00.0")
    assert why == "" and fake.bus == "0000:01:00.0"
    start = meter.snapshot()
    assert meter.joules_since(start) == {"GPU 1": pytest.approx(1.5)}
    assert meter.state() == {"power_w": 312.0, "sm_clock_mhz": 1980.0, "memory_clock_mhz": 3201.0}


def test_nvml_without_the_counter_gives_the_reason():
    meter, why = nvml_meter(torch.device("cuda", 0), nvml=FakeNvml(supported=False), bus_id=lambda i: "x")
    assert meter is None and "NVML gives no total energy for cuda:0" in why and "Not Supported" in why


PEAKS = ["--peak-bandwidth", "50e9", "--peak-flops", "500e9"]


def _profile(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "out.json"
    argv = ["--config", str(tiny_config(tmp_path / "m")), "--batch", "2", "--backend", "loop",
            "--warmup", "0", "--reps", "2", "--json", str(out), *PEAKS, *extra]  # fmt: skip
    assert profile_main(argv) == 0
    return json.loads(out.read_text())


def test_the_environment_switch_turns_the_counters_off(monkeypatch):
    monkeypatch.setenv("MOECAP_NO_ENERGY", "1")
    assert energy.energy_meter(torch.device("cpu")) == (None, "not measured (MOECAP_NO_ENERGY is set)")
    monkeypatch.setenv("MOECAP_NO_ENERGY", "0")
    monkeypatch.setattr(energy, "POWERCAP", Path("/nonexistent/powercap"))
    monkeypatch.setattr(energy, "rapl_meter", lambda root=None: (None, "no RAPL counters here"))
    assert energy.energy_meter(torch.device("cpu")) == (None, "no RAPL counters here")


def test_profile_without_counters_writes_null_energy_and_why(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("moecap_kernels.runner.energy_meter", lambda device: rapl_meter(tmp_path / "absent"))
    row = _profile(tmp_path)["results"][0]
    assert row["energy"] is None
    assert "no RAPL counters" in row["energy_unavailable"]
    out = capsys.readouterr().out
    assert "Energy: not measured (no RAPL counters" in out and "J/tok" not in out


def test_profile_with_counters_writes_joules_per_token(tmp_path, capsys, monkeypatch):
    root = _powercap(tmp_path)
    meter, _ = rapl_meter(root)
    real_read = meter.counters[0].read
    reads = iter(range(10**6))
    meter.counters[0].read = lambda: real_read() + 7.0 * next(reads)  # 7 J between successive reads
    monkeypatch.setattr("moecap_kernels.runner.energy_meter", lambda device: (meter, ""))
    monkeypatch.setattr(energy, "MIN_SECONDS", 0.05)
    row = _profile(tmp_path)["results"][0]
    e = row["energy"]
    assert e["measured"] is True and e["source"] == "RAPL: package-0, dram, package-1"
    assert e["domains_joules"]["package-0"] == pytest.approx(7.0)
    assert e["joules_per_token"] == pytest.approx(7.0 / (e["forwards"] * 2))
    assert "energy_unavailable" not in row
    assert "J/tok" in capsys.readouterr().out
    assert (
        _profile(tmp_path, "--no-energy")["results"][0]["energy_unavailable"] == "not measured (--no-energy)"
    )
