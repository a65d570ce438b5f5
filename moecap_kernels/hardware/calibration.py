"""Peaks measured on this very machine: streaming read bandwidth, copy bandwidth and dense GEMM
throughput per dtype, timed with torch and cached as JSON (one file per machine and torch version).

How far a calibration can be trusted is measured with it:

- every figure is measured in ``TRIALS`` trials over the same buffers and GEMM sizes; the best is
  kept (a ceiling) and the spread between the trials, (max − min) / max, is stored beside it;
- the share of the machine's CPU time that other processes or the hypervisor took while it ran
  is stored too (``cpu_load``);
- a calibration whose spread for a figure that divides (read bandwidth, a GEMM peak) exceeds
  ``SPREAD_LIMIT``, or whose others' share exceeds ``BUSY_LIMIT``, is *unstable*: it serves the run
  that made it, which says so, and is not cached.

A cached file records the machine, the thread count and torch's version; one that is corrupt or
implausible is ignored, and the line announcing the new calibration says why.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from moecap_kernels.dtypes import TORCH_DTYPES, canonical_compute_dtype
from moecap_kernels.errors import UserError
from moecap_kernels.files import cache_root, write_atomic
from moecap_kernels.hardware.cpu_load import OthersShare
from moecap_kernels.hardware.device import DeviceInfo, detect_device
from moecap_kernels.limits import MAX_SMALL_FILE_BYTES, PLAUSIBLE_BANDWIDTH, PLAUSIBLE_FLOPS, implausible
from moecap_kernels.streaming import distinct_pages, read_pass, stream_bytes
from moecap_kernels.timing import TimingStats, time_region

CACHE_SCHEMA = 2
TRIALS = 2
SPREAD_LIMIT = 0.10  # trials further apart than this: the machine changed under the calibration
BUSY_LIMIT = 0.15  # others' share of the CPU time above this: the calibration ran on a busy machine

Announce = Callable[[str], None]


@dataclass(frozen=True)
class Figure:
    """One measured figure: the best of its trials, and how far apart the trials were."""

    best: float
    spread: float

    @classmethod
    def of(cls, trials: Sequence[float]) -> Figure:
        best = max(trials)
        return cls(best, (best - min(trials)) / best if best > 0 else 0.0)


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
    read_bandwidth_spread: float = 0.0  # (max − min) / max over the trials
    copy_bandwidth_spread: float = 0.0
    gemm_spreads: Mapping[str, float] = field(default_factory=dict)
    others_cpu_share: float | None = None  # of the machine's CPU time while it ran; None: unknown
    duration_s: float = 0.0
    quick: bool = False
    from_cache: bool = field(default=False, compare=False)

    @property
    def label(self) -> str:
        """Source text used in Peaks, e.g. ``measured: calibration 2026-11-29 (cached)``."""
        return f"measured: calibration {self.date[:10]}" + (" (cached)" if self.from_cache else "")

    @property
    def unstable_reason(self) -> str | None:
        """Why these figures are not to be trusted (and not cached), or None when they are."""
        reasons = []
        if self.others_cpu_share is not None and self.others_cpu_share > BUSY_LIMIT:
            reasons.append(f"other processes took {self.others_cpu_share:.0%} of the CPU time while it ran")
        spreads = {  # the figures that divide (copy bandwidth is for reference only)
            "read bandwidth": self.read_bandwidth_spread,
            **{f"{dtype} GEMM": s for dtype, s in self.gemm_spreads.items()},
        }
        what, worst = max(spreads.items(), key=lambda item: item[1])
        if worst > SPREAD_LIMIT:
            reasons.append(f"its {TRIALS} trials of the {what} differ by {worst:.0%}")
        return "; ".join(reasons) or None

    @property
    def stable(self) -> bool:
        return self.unstable_reason is None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["from_cache"]
        return {"schema": CACHE_SCHEMA, **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        """Parse and validate; raises ValueError/KeyError/TypeError on anything malformed or implausible."""
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("schema") != CACHE_SCHEMA:
            raise ValueError(f"written in another format (schema {data.get('schema')!r}, not {CACHE_SCHEMA})")
        flops = {
            canonical_compute_dtype(k): _plausible(f"{k} GEMM", v, PLAUSIBLE_FLOPS, "FLOP/s")
            for k, v in dict(data["gemm_flops_per_s"]).items()
        }
        share = data.get("others_cpu_share")
        return cls(
            machine_id=str(data["machine_id"]),
            device_name=str(data["device_name"]),
            kind=str(data["kind"]),
            torch_version=str(data["torch_version"]),
            threads=int(data["threads"]),
            date=str(data["date"]),
            read_bandwidth_bytes_per_s=_plausible(
                "read bandwidth", data["read_bandwidth_bytes_per_s"], PLAUSIBLE_BANDWIDTH, "B/s"
            ),
            copy_bandwidth_bytes_per_s=_plausible(
                "copy bandwidth", data["copy_bandwidth_bytes_per_s"], PLAUSIBLE_BANDWIDTH, "B/s"
            ),
            gemm_flops_per_s=flops,
            gemm_sizes={canonical_compute_dtype(k): int(v) for k, v in dict(data["gemm_sizes"]).items()},
            gemm_notes={
                canonical_compute_dtype(k): str(v) for k, v in dict(data.get("gemm_notes", {})).items()
            },
            read_bandwidth_spread=_fraction("read_bandwidth_spread", data["read_bandwidth_spread"]),
            copy_bandwidth_spread=_fraction("copy_bandwidth_spread", data["copy_bandwidth_spread"]),
            gemm_spreads={
                canonical_compute_dtype(k): _fraction(f"gemm_spreads.{k}", v)
                for k, v in dict(data["gemm_spreads"]).items()
            },
            others_cpu_share=None if share is None else _fraction("others_cpu_share", share),
            duration_s=float(data.get("duration_s", 0.0)),
            quick=bool(data.get("quick", False)),
        )


def _plausible(label: str, value: Any, bounds: tuple[float, float], unit: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{label} must be a number, got {value!r}")
    problem = implausible(label, float(value), bounds, unit)
    if problem:
        raise ValueError(problem)
    return float(value)


def _fraction(label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{label} must be a number from 0 to 1, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def cache_path(info: DeviceInfo, torch_version: str | None = None) -> Path:
    """Where the calibration of ``info`` under this (or the given) torch version lives."""
    version = re.sub(r"[^A-Za-z0-9._-]", "_", torch_version or torch.__version__)
    return cache_root() / f"calibration-{info.machine_id}-{version}.json"


def read_cache(info: DeviceInfo) -> tuple[Calibration | None, str | None]:
    """(the cached calibration, None), or (None, why a cached file was ignored), or (None, None)."""
    path = cache_path(info)
    try:
        size = path.stat().st_size
        if size > MAX_SMALL_FILE_BYTES:
            raise ValueError(f"{size} bytes is too big for a calibration")
        cal = Calibration.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        return None, f"ignored the cached calibration {path}: {_why(exc)}"
    if cal.machine_id != info.machine_id or cal.torch_version != torch.__version__:
        return None, f"ignored the cached calibration {path}: it was made on another machine or torch"
    if not cal.stable:
        return None, f"ignored the cached calibration {path}: {cal.unstable_reason}"
    return replace(cal, from_cache=True), None


def _why(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "not valid JSON (nested too deeply)"
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({exc.msg} at line {exc.lineno})"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, KeyError):
        return f"field {exc} missing"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def save_calibration(cal: Calibration, info: DeviceInfo) -> Path:
    """Write ``cal`` atomically (temp file in the same folder, then os.replace); return the path."""
    path = cache_path(info, cal.torch_version)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(cal.to_json(), indent=2, sort_keys=True) + "\n")
    return path


def cached_calibration(
    info: DeviceInfo, dtypes: Sequence[str], quick: bool = False
) -> tuple[Calibration | None, str]:
    """(the cached calibration that serves this request, "") or (None, why none does)."""
    cal, ignored = read_cache(info)
    if cal is None:
        return None, ignored or "none cached yet"
    missing = [d for d in (canonical_compute_dtype(d) for d in dtypes) if d not in cal.gemm_flops_per_s]
    if missing:
        return None, f"the cached one lacks {', '.join(missing)}"
    if cal.quick and not quick:
        return None, "the cached one is a quick calibration"
    if info.kind == "cpu" and cal.threads != torch.get_num_threads():
        return None, f"the cached one ran {cal.threads} threads, this run {torch.get_num_threads()}"
    return cal, ""


def calibrate(
    device: torch.device | str,
    dtypes: Sequence[str],
    *,
    force: bool = False,
    quick: bool = False,
    announce: Announce = lambda line: None,
) -> Calibration:
    """Measured read/copy bandwidth and dense GEMM peaks for ``dtypes`` on ``device``.

    Reuses the cache unless ``force``, the cache lacks a dtype, the thread count changed, or a
    full run was asked for and only a quick one is cached. ``announce`` receives one line before
    measuring (saying why) and one after when the result is not cached (saying why not). The cost
    is bounded by the plan (``_QUICK`` or ``_FULL``): streamed buffers bounded in bytes, a few
    repetitions, and a fixed GEMM time budget per CPU dtype, so a slow GEMM path (float16 on most
    CPUs) is measured at smaller sizes and flagged in ``gemm_notes`` rather than waited on.
    """
    device = torch.device(device)
    wanted = [canonical_compute_dtype(d) for d in dtypes]
    info = detect_device(device)
    why = "asked for"
    if not force:
        cached, why = cached_calibration(info, wanted, quick)
        if cached is not None:
            return cached
    announce(f"calibrating {info.name}: read bandwidth and {', '.join(wanted)} GEMM peak ({why})…")
    cal = _measure(device, info, wanted, quick)
    if not cal.stable:
        announce(
            f"calibration unstable ({cal.unstable_reason}): used for this run only and not cached; "
            "rerun with --calibrate on a quiet machine"
        )
        return cal
    try:
        save_calibration(cal, info)
    except OSError as exc:  # a read-only home must not stop a profile
        announce(f"calibration not cached: cannot write {cache_path(info)} ({exc.strerror or exc})")
    return cal


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """How hard to measure: sizes, repetitions and the per-dtype time budget."""

    bw_multiples: tuple[int, ...]  # buffer sizes as multiples of the LLC (bounded: streaming.stream_bytes)
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
    read_pass(device)  # builds the extension now if it must: a compiler is no measurement's load
    start = time.perf_counter()
    gemm: dict[str, tuple[Figure, int, str]] = {}
    with OthersShare() as load:
        read, copy = _measure_bandwidth(device, info, plan)
        for dtype in dtypes:
            if device.type == "cuda":
                gemm[dtype] = (*_cuda_gemm_peak(device, dtype, plan), "")
            else:
                gemm[dtype] = _cpu_gemm_peak(dtype, plan)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for label, figure, bounds, unit in (
        ("read bandwidth", read.best, PLAUSIBLE_BANDWIDTH, "B/s"),
        ("copy bandwidth", copy.best, PLAUSIBLE_BANDWIDTH, "B/s"),
        *((f"{d} GEMM", g[0].best, PLAUSIBLE_FLOPS, "FLOP/s") for d, g in gemm.items()),
    ):
        problem = implausible(f"a measured {label} of", figure, bounds, unit)
        if problem:
            raise UserError(f"{problem}; give --peak-bandwidth and --peak-flops instead")
    return Calibration(
        machine_id=info.machine_id,
        device_name=info.name,
        kind=info.kind,
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        read_bandwidth_bytes_per_s=read.best,
        copy_bandwidth_bytes_per_s=copy.best,
        gemm_flops_per_s={d: g[0].best for d, g in gemm.items()},
        gemm_sizes={d: g[1] for d, g in gemm.items()},
        gemm_notes={d: g[2] for d, g in gemm.items() if g[2]},
        read_bandwidth_spread=read.spread,
        copy_bandwidth_spread=copy.spread,
        gemm_spreads={d: g[0].spread for d, g in gemm.items()},
        others_cpu_share=load.share,
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


def _measure_bandwidth(device: torch.device, info: DeviceInfo, plan: _Plan) -> tuple[Figure, Figure]:
    """(read, copy) bytes/s, each the best of ``TRIALS`` trials over the same buffers.

    A trial's read figure is the best over buffer sizes and placements of the median over
    repetitions, for the faster of ``torch.sum`` and (CPU) the extension's ``stream_read``; both
    read every byte once and write nothing. Copy is ``dst.copy_(src)`` counted as 2 × bytes.
    """
    inner = 10 if device.type == "cuda" else 1
    readers = list(dict.fromkeys([torch.sum, read_pass(device)]))
    # On a CPU the figure depends on where a buffer's pages land (one allocation can read much
    # slower than another on the same machine: benchmarks/results/compare-2026-11-29-amd-epyc.md
    # records a calibrated 81.8 GB/s beside 46.0 GB/s for a torch sum of a fresh 1 GiB buffer in
    # the same run), so several buffers live at once and the fastest counts: the ceiling a kernel
    # whose data landed well reaches. Smaller sizes read a prefix of the same buffers.
    placements = plan.cpu_placements if device.type == "cpu" else 1
    sizes = sorted(
        {
            stream_bytes(info.llc_bytes, m, available_bytes=info.memory_available_bytes, buffers=placements)
            for m in plan.bw_multiples
        }
    )
    bufs = [distinct_pages(sizes[-1], device) for _ in range(placements)]

    def read_trial() -> float:
        best = 0.0
        for nbytes in sizes:
            for buf in bufs:
                for reader in readers:
                    fn = functools.partial(reader, buf[: nbytes // 4])
                    stats = _per_call(fn, device, reps=plan.bw_reps, inner=inner, warmup=1)
                    best = max(best, nbytes / stats.median)
        return best

    read = Figure.of([read_trial() for _ in range(TRIALS)])
    bufs.clear()  # free them before the copy buffers are made
    nbytes = stream_bytes(
        info.llc_bytes, plan.bw_multiples[0], available_bytes=info.memory_available_bytes, buffers=2
    )  # src and dst
    src = distinct_pages(nbytes, device)
    dst = torch.empty_like(src)
    copies = [
        2
        * nbytes
        / _per_call(lambda: dst.copy_(src), device, reps=plan.bw_reps, inner=inner, warmup=1).median
        for _ in range(TRIALS)
    ]
    return read, Figure.of(copies)


def _gemm_operands(n: int, dtype: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if dtype == "int8":
        return tuple(torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8) for _ in range(2))
    a = torch.randn(n, n, device=device, dtype=TORCH_DTYPES[dtype])
    return a, torch.randn(n, n, device=device, dtype=TORCH_DTYPES[dtype])


def _gemm_rate(
    n: int, dtype: str, device: torch.device, reps: int, *, inner: int = 1, warmup: int = 0
) -> float:
    """2n³ / the fastest of ``reps`` timed calls of an n×n×n matmul (``out=`` reused); int8 through
    ``torch._int_mm`` (int32 results), the GEMM a w8a8 layer runs."""
    a, b = _gemm_operands(n, dtype, device)
    if dtype == "int8":
        out = torch.empty(n, n, device=device, dtype=torch.int32)
        call = functools.partial(torch._int_mm, a, b, out=out)
    else:
        call = functools.partial(torch.matmul, a, b, out=torch.empty_like(a))
    stats = _per_call(call, device, reps=reps, inner=inner, warmup=warmup)
    return 2 * n**3 / min(stats.samples_s)


def _cpu_gemm_peak(dtype: str, plan: _Plan) -> tuple[Figure, int, str]:
    """(figure, n it was reached at, note) over square GEMMs n = 128, 256, … within a time budget.

    Each step predicts the next size's cost (8× this one); when that would overrun the budget the
    search stops, and the best size is timed again for the other trials. Stopping below
    ``SLOW_GEMM_N`` marks a slow path (float16 on most CPUs), noted so the figure is not mistaken
    for a real peak.
    """
    cpu = torch.device("cpu")
    deadline = time.perf_counter() + plan.cpu_gemm_budget_s
    n, best, best_n = 128, 0.0, 128
    while True:
        started = time.perf_counter()
        rate = _gemm_rate(n, dtype, cpu, plan.gemm_reps)  # no warm-up: every call counts
        if rate > best:
            best, best_n = rate, n
        next_cost = 8 * (time.perf_counter() - started)
        if 2 * n <= plan.cpu_gemm_max_n and time.perf_counter() + next_cost <= deadline:
            n *= 2
            continue
        note = _slow_note(n, rate) if n < SLOW_GEMM_N else ""
        again = [_gemm_rate(best_n, dtype, cpu, plan.gemm_reps) for _ in range(TRIALS - 1)]
        return Figure.of([best, *again]), best_n, note


def _slow_note(n: int, rate: float) -> str:
    return (
        f"slow path: the time budget stopped the search at n={n} ({rate / 1e9:.3g} GFLOP/s there); "
        "this dtype has no fast GEMM on this device"
    )


def _cuda_gemm_peak(device: torch.device, dtype: str, plan: _Plan) -> tuple[Figure, int]:
    """(figure, n) over large square GEMMs timed with CUDA events; the best size is timed again for
    the other trials."""
    reps = max(plan.gemm_reps, 3)
    with _ieee_fp32_matmul():
        # one warm-up call per size (cuBLAS handle and heuristics); time_region synchronises after it
        rates = {n: _gemm_rate(n, dtype, device, reps, inner=5, warmup=1) for n in plan.cuda_gemm_sizes}
        best_n = max(rates, key=rates.__getitem__)
        again = [_gemm_rate(best_n, dtype, device, reps, inner=5, warmup=1) for _ in range(TRIALS - 1)]
    return Figure.of([rates[best_n], *again]), best_n


@contextlib.contextmanager
def _ieee_fp32_matmul() -> Iterator[None]:
    """Measure true FP32 (no TF32) and restore the caller's setting afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
