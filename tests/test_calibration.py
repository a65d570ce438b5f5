"""The calibration: trials and their spread, unstable results never cached, a cache that ignores
corrupt or implausible files and says why, and a quick real calibration on this CPU."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moecap_kernels import _ext, files
from moecap_kernels import hardware as hw
from moecap_kernels._ext import load_extension
from moecap_kernels.hardware import calibration as calib
from tests.hardware_fakes import fake_calibration, fake_info


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    load_extension()  # built (or found) in the real cache first: calibration uses its stream_read
    monkeypatch.setenv("MOECAP_CACHE_DIR", str(tmp_path))
    return tmp_path


# ----------------------------------------------------------------------------- stability


def test_figure_keeps_the_best_trial_and_their_spread() -> None:
    figure = calib.Figure.of([80.0, 100.0])
    assert (figure.best, figure.spread) == (100.0, 0.2)
    assert calib.Figure.of([5.0, 5.0]).spread == 0.0


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"others_cpu_share": 0.45}, "other processes took 45% of the CPU time"),
        ({"read_bandwidth_spread": 0.25}, "trials of the read bandwidth differ by 25%"),
        ({"gemm_spreads": {"bfloat16": 0.3, "float32": 0.0}}, "trials of the bfloat16 GEMM differ by 30%"),
    ],
)
def test_busy_machine_or_disagreeing_trials_make_it_unstable(changes: dict, needle: str) -> None:
    assert fake_calibration().stable and fake_calibration().unstable_reason is None
    cal = fake_calibration(**changes)
    assert not cal.stable and needle in (cal.unstable_reason or "")


def test_unknown_load_or_a_wobbly_copy_figure_alone_do_not_make_it_unstable() -> None:
    """Only the figures that divide decide: the copy bandwidth is for reference."""
    assert fake_calibration(others_cpu_share=None).stable
    assert fake_calibration(copy_bandwidth_spread=0.5).stable


def _patch_measure(monkeypatch: pytest.MonkeyPatch, cal: hw.Calibration) -> list[str]:
    """calibrate() measuring ``cal`` (for this machine); returns the list its announcements land in."""
    info = hw.detect_device("cpu")
    measured = replace(cal, machine_id=info.machine_id, kind="cpu")
    monkeypatch.setattr(calib, "_measure", lambda *args: measured)
    return []


def test_an_unstable_calibration_is_not_cached_and_says_so(cache_dir: Path, monkeypatch) -> None:
    lines = _patch_measure(monkeypatch, fake_calibration(others_cpu_share=0.5))
    cal = hw.calibrate("cpu", ["bfloat16"], announce=lines.append)
    assert not cal.stable and not cal.from_cache
    assert list(cache_dir.iterdir()) == []
    assert lines[0].startswith("calibrating") and "none cached yet" in lines[0]
    assert lines[1].startswith("calibration unstable") and "not cached" in lines[1] and len(lines) == 2


def test_a_stable_calibration_is_cached_and_reused(cache_dir: Path, monkeypatch) -> None:
    lines = _patch_measure(monkeypatch, fake_calibration())
    first = hw.calibrate("cpu", ["bfloat16"], announce=lines.append)
    again = hw.calibrate("cpu", ["bfloat16"], announce=lines.append)
    assert not first.from_cache and again.from_cache and again == first
    assert len(lines) == 1  # one announcement: the second call measured nothing
    forced = hw.calibrate("cpu", ["bfloat16"], force=True, announce=lines.append)
    assert not forced.from_cache and "asked for" in lines[1]


def test_a_cache_for_other_threads_or_dtypes_is_remeasured(cache_dir: Path, monkeypatch) -> None:
    lines = _patch_measure(monkeypatch, fake_calibration(threads=torch.get_num_threads() + 3))
    hw.calibrate("cpu", ["bfloat16"], announce=lines.append)
    hw.calibrate("cpu", ["bfloat16"], announce=lines.append)
    assert "threads" in lines[1]
    lines.clear()
    _patch_measure(monkeypatch, fake_calibration())
    hw.calibrate("cpu", ["bfloat16"])
    hw.calibrate("cpu", ["float16"], announce=lines.append)
    assert "lacks float16" in lines[0]


def test_an_unwritable_cache_is_one_announced_line(cache_dir: Path, monkeypatch) -> None:
    lines = _patch_measure(monkeypatch, fake_calibration())
    monkeypatch.setattr(calib, "save_calibration", lambda cal, info: (_ for _ in ()).throw(OSError(30, "ro")))
    cal = hw.calibrate("cpu", ["bfloat16"], announce=lines.append)
    assert cal.stable and lines[-1].startswith("calibration not cached: cannot write")


# ----------------------------------------------------------------------------- the cache file


def test_cache_round_trip(cache_dir: Path) -> None:
    info = fake_info()
    assert hw.read_cache(info) == (None, None)
    cal = fake_calibration(gemm_notes={"float32": "slow path"}, quick=True, duration_s=1.5)
    path = hw.save_calibration(cal, info)
    assert path.parent == cache_dir and path.name.startswith(f"calibration-{info.machine_id}-")
    loaded, why = hw.read_cache(info)
    assert why is None and loaded == cal and loaded is not None and loaded.from_cache
    assert json.loads(path.read_text())["torch_version"] == torch.__version__
    assert [p.name for p in cache_dir.iterdir()] == [path.name]  # no temp files left behind


def _valid_json() -> dict:
    return fake_calibration().to_json()


CORRUPT = {
    "empty": ("", "not valid JSON"),
    "not json": ("{not json", "not valid JSON"),
    "a list": ("[]", "expected a JSON object"),
    "deeply nested": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "old schema": (json.dumps({**_valid_json(), "schema": 1}), "another format"),
    "missing field": (json.dumps({k: v for k, v in _valid_json().items() if k != "threads"}), "threads"),
    "tiny bandwidth": (json.dumps({**_valid_json(), "read_bandwidth_bytes_per_s": 1e-300}), "implausible"),
    "negative bandwidth": (json.dumps({**_valid_json(), "copy_bandwidth_bytes_per_s": -5}), "implausible"),
    "string figure": (json.dumps({**_valid_json(), "read_bandwidth_bytes_per_s": "fast"}), "number"),
    "huge flops": (json.dumps({**_valid_json(), "gemm_flops_per_s": {"bfloat16": 1e30}}), "implausible"),
    "unknown dtype": (json.dumps({**_valid_json(), "gemm_flops_per_s": {"int4": 1e12}}), "int4"),
    "spread above 1": (json.dumps({**_valid_json(), "read_bandwidth_spread": 3}), "0 to 1"),
    "unstable": (json.dumps({**_valid_json(), "others_cpu_share": 0.9}), "other processes"),
    "other machine": (json.dumps({**_valid_json(), "machine_id": "someone-else"}), "another machine"),
    "too big": (" " * (2 << 20), "too big"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_a_corrupt_or_implausible_cache_is_ignored_with_a_reason(cache_dir: Path, case: str) -> None:
    text, needle = CORRUPT[case]
    info = fake_info()
    hw.cache_path(info).write_text(text)
    cal, why = hw.read_cache(info)
    assert cal is None and why is not None and "\n" not in why
    assert why.startswith("ignored the cached calibration") and needle in why, why


def test_calibration_json_lists_every_field_but_from_cache() -> None:
    data = replace(fake_calibration(), from_cache=True).to_json()
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
        "read_bandwidth_spread",
        "copy_bandwidth_spread",
        "gemm_spreads",
        "others_cpu_share",
        "duration_s",
        "quick",
    ]
    assert data["schema"] == calib.CACHE_SCHEMA and data["gemm_sizes"] == {"bfloat16": 8192, "float32": 8192}
    assert hw.Calibration.from_json(data) == fake_calibration()


def test_calibrations_and_builds_share_one_cache_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MOECAP_CACHE_DIR > XDG_CACHE_HOME/moecap_kernels > ~/.cache/moecap_kernels, for both."""
    info = fake_info()
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
        hw.save_calibration(fake_calibration(), fake_info())
    assert list(cache_dir.iterdir()) == []


# ----------------------------------------------------------------------------- measuring


def test_quick_cpu_calibration_is_plausible_and_cached_when_stable(cache_dir: Path) -> None:
    """Whether this machine is quiet is not ours to assert: a stable result must be cached and
    reused, an unstable one must not be cached and must say why."""
    lines: list[str] = []
    cal = hw.calibrate(torch.device("cpu"), ["float32", "bf16"], quick=True, announce=lines.append)
    assert not cal.from_cache and cal.quick and cal.kind == "cpu"
    assert 1e9 < cal.read_bandwidth_bytes_per_s < 1e13
    assert 1e9 < cal.copy_bandwidth_bytes_per_s < 1e13
    assert set(cal.gemm_flops_per_s) == set(cal.gemm_spreads) == {"float32", "bfloat16"}
    assert all(1e8 < f < 1e14 for f in cal.gemm_flops_per_s.values())
    assert all(0 <= s <= 1 for s in (cal.read_bandwidth_spread, *cal.gemm_spreads.values()))
    assert cal.others_cpu_share is None or cal.others_cpu_share >= 0
    again = hw.calibrate("cpu", ["bfloat16"], quick=True)
    if cal.stable:
        assert again.from_cache and again == cal and len(lines) == 1
        peaks = hw.resolve_peaks(
            hw.detect_device("cpu"), "float32", calibration=again, peak_bandwidth=None, peak_flops=None
        )
        assert peaks.bandwidth_source.endswith("(cached)") and "(cached)" in peaks.flops_source
    else:
        assert not again.from_cache and lines[1].startswith("calibration unstable")


def test_copy_buffer_size_counts_source_and_destination(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []

    def spy(llc: int, multiple: int, *, available_bytes: int | None = None, buffers: int = 1) -> int:
        asked.append(buffers)
        return 2**20

    monkeypatch.setattr(calib, "stream_bytes", spy)
    plan = calib._Plan((8,), 1, 1, 1, 0.1, 128, (128,))
    read, copy = calib._measure_bandwidth(torch.device("cpu"), hw.detect_device("cpu"), plan)
    assert asked == [1, 2] and read.best > 0 and copy.best > 0  # one read buffer; copy's src and dst


def test_cpu_gemm_budget_flags_a_slow_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GEMM that is slow at every size stops early and is noted, within its time budget."""
    real = torch.matmul

    def slow_matmul(a: torch.Tensor, b: torch.Tensor, **kw) -> torch.Tensor:
        time.sleep(a.shape[0] ** 3 * 2e-9)  # 2e-9·n³ s for 2n³ FLOP: 1 GFLOP/s
        return real(a, b, **kw)

    monkeypatch.setattr(calib.torch, "matmul", slow_matmul)
    plan = calib._Plan((8,), 1, 3, 2, 0.3, 2048, (4096,))
    figure, n, note = calib._cpu_gemm_peak("float32", plan)
    # the sleep alone caps the rate at 1 GFLOP/s (no lower bound: a loaded machine is slower still)
    assert n < calib.SLOW_GEMM_N and note.startswith("slow path") and 0 < figure.best < 1.01e9


def test_the_gpu_gemm_search_times_its_best_size_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path's logic, run on the CPU (it only needs a device that matmul runs on)."""
    timed: list[int] = []
    real = calib._gemm_rate

    def spy(n: int, *args, **kwargs) -> float:
        timed.append(n)
        return real(n, *args, **kwargs)

    monkeypatch.setattr(calib, "_gemm_rate", spy)
    plan = calib._Plan((8,), 1, 1, 1, 0.1, 128, (64, 128))
    before = torch.get_float32_matmul_precision()
    figure, n = calib._cuda_gemm_peak(torch.device("cpu"), "float32", plan)
    assert timed[:2] == [64, 128] and timed[2] == n and len(timed) == 3
    assert figure.best > 0 and 0 <= figure.spread < 1
    assert torch.get_float32_matmul_precision() == before  # TF32 setting restored
