"""Side-by-side comparison of every available backend on the same layers, against the roofline.

For each layer and scenario, all backends run on the same weights, inputs and routing, in one
process, interleaved (each repetition runs every backend once, in a shuffled order) so drift of
the machine hits them alike. The denominators
are this machine's measured ceilings (calibrated in the same run, and themselves checked against
plain torch / numpy reductions and copies and a large torch.matmul). Also measured: what the
device-side counting costs: each counting call timed in place, right after its forward, and the
last backend run with counters on and off in the same interleaving.

    python benchmarks/compare.py            # full: 4 layers, decode 1–64, prefill 512 and 2048
    python benchmarks/compare.py --quick    # 2 layers, fewer scenarios and repetitions
    python benchmarks/compare.py --quant all   # weight formats side by side (compare_formats.py)

Writes benchmarks/results/compare-<date>-<device>.md and .json (``compare-formats-…`` with
``--quant``), atomically.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import compare_formats
import hf_blocks
import numpy as np
import results_file
import torch
from rich.console import Console

from moecap_kernels import hardware
from moecap_kernels._ext import extension_status, has_op
from moecap_kernels.backends import backend_names, get_backend
from moecap_kernels.counters import CountAccumulator, Counts
from moecap_kernels.dtypes import torch_dtype
from moecap_kernels.quant.formats import ALL_FORMATS
from moecap_kernels.reference import relative_error
from moecap_kernels.report import human_bytes, write_atomic
from moecap_kernels.routing import RoutingChoice
from moecap_kernels.runner import INPUT_COPIES, BackendRun, ProfileRequest, Row, Scenario, needs_flush
from moecap_kernels.spec import MoESpec, load_preset
from moecap_kernels.timing import CacheFlusher, time_interleaved
from moecap_kernels.weights import MoEWeights, random_weights

FULL_MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v2-lite")
QUICK_MODELS = ("qwen3-30b-a3b", "olmoe-1b-7b")
FULL_SCENARIOS = (
    *(Scenario("decode", b) for b in (1, 2, 4, 8, 16, 32, 64)),
    Scenario("prefill", 1, 512),
    Scenario("prefill", 1, 2048),
)
FORMAT_MODELS = ("mixtral-8x7b", "qwen3-30b-a3b")
FORMAT_SCENARIOS = tuple(Scenario("decode", b) for b in (1, 8, 64))
QUICK_SCENARIOS = (
    Scenario("decode", 1),
    Scenario("decode", 4),
    Scenario("decode", 32),
    Scenario("prefill", 1, 512),
)
CHECKED_TOKENS = 64  # rows this small are checked against the float64 reference (cheap beside the timing)


@dataclass(frozen=True)
class Measured:
    """One backend in one scenario."""

    model: str
    phase: str
    tokens: int
    backend: str
    median_s: float
    p10_s: float
    p90_s: float
    compulsory_bytes: int
    useful_flops: int
    s_mbu: float  # against the bandwidth calibrated at the start of the run
    s_mbu_paired: float  # against a streaming read timed interleaved with this scenario's runs
    s_mfu: float
    roofline_s: float
    speedup_vs_loop: float | None
    counting_overhead: float | None  # median(on) / median(off) − 1, for the last backend only
    counting_cost_s: float | None  # median time of one forward's counting, in place (InSituCounting)
    small_op_after_run_s: float  # the control: a trivial op right after a timed run (SmallOpAfterRun)
    rel_error: float | None = None  # output against the float64 reference (rows up to CHECKED_TOKENS)


# --- ceilings and their cross-checks -------------------------------------------------------------


def _best_of(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def ceiling_checks(calibration: hardware.Calibration, dtype: str) -> dict[str, Any]:
    """The calibration's figures beside plain large reductions, copies and a big matmul (CPU)."""
    n_bytes = 1 << 30
    t = torch.rand(n_bytes // 4)  # random, never constant pages (see streaming.distinct_pages)
    t_dst = torch.empty_like(t)
    a = t.numpy().copy()
    a_dst = np.empty_like(a)
    figures = {
        "torch sum 1 GiB": n_bytes / _best_of(t.sum, 5),
        "torch copy 1 GiB (r+w)": 2 * n_bytes / _best_of(lambda: t_dst.copy_(t), 5),
        "numpy sum 1 GiB": n_bytes / _best_of(a.sum, 5),
        "numpy copy 1 GiB (r+w)": 2 * n_bytes / _best_of(lambda: np.copyto(a_dst, a), 5),
    }
    size = 4096
    x = torch.randn(size, size).to(torch_dtype(dtype))
    y = torch.randn(size, size).to(torch_dtype(dtype))
    matmul = 2 * size**3 / _best_of(lambda: x @ y, 3)
    bandwidth = calibration.read_bandwidth_bytes_per_s
    peak = calibration.gemm_flops_per_s[dtype]
    return {
        "calibrated_read_bandwidth": bandwidth,
        "calibrated_gemm_flops": peak,
        "bandwidth_checks": {
            k: {"bytes_per_s": v, "ratio_to_calibrated": v / bandwidth} for k, v in figures.items()
        },
        "gemm_check": {f"torch.matmul {size}³ {dtype}": matmul, "ratio_to_calibrated": matmul / peak},
    }


def compulsory_weights(weights: MoEWeights, ids: torch.Tensor) -> list[torch.Tensor]:
    """The weight tensors one forward must read: activated experts, shared experts, router."""
    activated = torch.unique(ids).tolist()
    tensors = [w[e] for e in activated for w in (weights.w_in, weights.w_out)]
    tensors += [
        w[s] for s in range(weights.shared_w_in.shape[0]) for w in (weights.shared_w_in, weights.shared_w_out)
    ]
    return [*tensors, weights.router]


class InSituCounting:
    """Wraps a run's counter and times each ``add`` where the profile makes it, right after the
    forward: a loop of counting calls alone finds everything hot and reads several times lower.
    Read it beside ``SmallOpAfterRun``: right after a forward any small op pays for cold caches,
    so this is an upper bound on what counting adds. perf_counter times the host side only, which
    on a CPU is all of it.
    """

    def __init__(self, counter: CountAccumulator) -> None:
        self.counter = counter
        self.implementation = counter.implementation
        self.samples_s: list[float] = []

    def add(self, topk_ids: torch.Tensor) -> None:
        start = time.perf_counter()
        self.counter.add(topk_ids)
        self.samples_s.append(time.perf_counter() - start)

    def reset(self) -> None:
        self.counter.reset()
        self.samples_s.clear()

    def read(self) -> Counts:
        return self.counter.read()


class SmallOpAfterRun:
    """The control for ``InSituCounting``: times a trivial op (adding 0 to 8 floats) right after
    each timed run, outside the timed regions, then calls ``then`` (the cache flush, if any)."""

    def __init__(self, device: torch.device, then: Callable[[], None] | None) -> None:
        self.buffer = torch.zeros(8, device=device)
        self.then = then
        self.samples_s: list[float] = []

    def __call__(self) -> None:
        start = time.perf_counter()
        self.buffer.add_(0.0)
        self.samples_s.append(time.perf_counter() - start)
        if self.then is not None:
            self.then()


class TransformersRun:
    """transformers' block as a timed run: its own router, experts and combine on the row's inputs."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], row: Row, check: bool) -> None:
        self.forward, self.row = forward, row
        # the same layer, checked against the float64 reference where that costs little (decode)
        self.rel_error = relative_error(forward(row.inputs[0]), row.reference()) if check else None

    def __call__(self, i: int) -> None:
        self.forward(self.row.inputs[i % INPUT_COPIES])


def _transformers_runs(
    spec: MoESpec, weights: MoEWeights, row: Row, tokens: int
) -> dict[str, TransformersRun]:
    """{"transformers:<implementation>": run} for each implementation that can run this layer here."""
    runs = {}
    for implementation in hf_blocks.IMPLEMENTATIONS:
        if hf_blocks.why_not(spec.name, spec, implementation, tokens) is None:
            forward = hf_blocks.hf_block(spec.name, spec, weights, implementation)
            check = tokens <= CHECKED_TOKENS
            runs[f"transformers:{implementation}"] = TransformersRun(forward, row, check)
    return runs


# --- one layer -----------------------------------------------------------------------------------


def compare_layer(
    spec: MoESpec,
    scenarios: tuple[Scenario, ...],
    backends: tuple[str, ...],
    device: torch.device,
    info: hardware.DeviceInfo,
    peaks: hardware.Peaks,
    reps: dict[str, int],
    console: Console,
    transformers_blocks: bool = True,
) -> list[Measured]:
    """Every backend, and transformers' own block under each experts implementation it offers
    (when installed and wired up for this layer), interleaved per scenario."""
    weights = random_weights(spec, device, seed=0)
    read = torch.ops.moecap.stream_read if has_op("stream_read", device.type) else torch.sum
    rows = []
    for scenario in scenarios:
        request = ProfileRequest(
            spec=spec,
            scenarios=(scenario,),
            backends=backends,
            routing=RoutingChoice("router"),
            device=device,
            warmup=1 if scenario.phase == "prefill" else 2,
            reps=reps[scenario.phase],
            check_accuracy=scenario.tokens <= CHECKED_TOKENS,
        )
        row = Row(request, weights, scenario, scenario.tokens)
        runs = [BackendRun(request, weights, row, name) for name in backends]
        for run in runs:
            run.counter = InSituCounting(run.counter)
        best_guess = backends[-1]  # measured below; the overhead pair uses the last (fastest-intended) one
        runs.append(BackendRun(request, weights, row, best_guess, count=False))
        # A CPU's read bandwidth depends on the buffer read and on the reader (in
        # benchmarks/results/compare-2026-11-29-amd-epyc.md, torch.sum over a fresh 1 GiB buffer read
        # 46.0 GB/s where the calibration, in the same run, reached 81.8 GB/s), so the paired ceiling
        # streams the very bytes the layer must read: the activated experts', the shared experts' and
        # the router's weights, in the same interleaving.
        hf_runs = _transformers_runs(spec, weights, row, scenario.tokens) if transformers_blocks else {}
        runs += hf_runs.values()
        probe = compulsory_weights(weights, row.ids)
        probe_bytes = sum(t.numel() * t.element_size() for t in probe)
        runs.append(lambda i, probe=probe: [read(t) for t in probe])
        flush = needs_flush(spec, row, info)
        control = SmallOpAfterRun(device, CacheFlusher(info.llc_bytes, device) if flush else None)
        timings = time_interleaved(
            runs,
            device,
            warmup=request.warmup,
            reps=request.reps,
            between=control,
            after_warmup=[run.reset_counts for run in runs[: len(backends) + 1]],
        )
        n = len(backends)  # runs: the backends, the last one without counting, transformers', the probe
        results = [
            run.finish(scenario, timing, info, peaks, flush)
            for run, timing in zip(runs[:n], timings[:n], strict=True)
        ]
        paired_bandwidth = probe_bytes / timings[-1].median
        loop_time = next((r.time.median for r in results if r.backend == "loop"), None)
        overhead = timings[n - 1].median / timings[n].median - 1
        measured = []
        for r, run in zip(results, runs[: len(results)], strict=True):
            measured.append(
                Measured(
                    model=spec.name,
                    phase=scenario.phase,
                    tokens=r.tokens,
                    backend=r.backend,
                    median_s=r.time.median,
                    p10_s=r.time.p10,
                    p90_s=r.time.p90,
                    compulsory_bytes=r.bytes.compulsory,
                    useful_flops=r.flops.useful,
                    s_mbu=r.util.s_mbu,
                    s_mbu_paired=r.bytes.compulsory / r.time.median / paired_bandwidth,
                    s_mfu=r.util.s_mfu,
                    roofline_s=r.util.roofline_time_s,
                    speedup_vs_loop=None if loop_time is None else loop_time / r.time.median,
                    counting_overhead=overhead if r.backend == best_guess else None,
                    counting_cost_s=float(np.median(run.counter.samples_s)),
                    small_op_after_run_s=float(np.median(control.samples_s)),
                    rel_error=r.rel_error,
                )
            )
        like = measured[0]  # transformers' blocks compute the same layer: same bytes, FLOPs, routing
        for (name, run), timing in zip(hf_runs.items(), timings[n + 1 : -1], strict=True):
            t = timing.median
            measured.append(
                Measured(
                    model=spec.name, phase=scenario.phase, tokens=like.tokens, backend=name, median_s=t,
                    p10_s=timing.p10, p90_s=timing.p90, compulsory_bytes=like.compulsory_bytes,
                    useful_flops=like.useful_flops, s_mbu=like.s_mbu * like.median_s / t,
                    s_mbu_paired=like.s_mbu_paired * like.median_s / t, s_mfu=like.s_mfu * like.median_s / t,
                    roofline_s=like.roofline_s, speedup_vs_loop=None if loop_time is None else loop_time / t,
                    counting_overhead=None, counting_cost_s=None,
                    small_op_after_run_s=float(np.median(control.samples_s)),
                    rel_error=run.rel_error,
                )
            )  # fmt: skip
        best = min(measured, key=lambda m: m.median_s)
        console.print(
            f"  {spec.name} {scenario.phase} T={row.ids.shape[0]}: best {best.backend} "
            f"{best.median_s * 1e3:.2f} ms, S-MBU {best.s_mbu:.2f} (paired {best.s_mbu_paired:.2f}), "
            f"S-MFU {best.s_mfu:.2f}"
        )
        rows += measured
    del weights
    return rows


# --- output --------------------------------------------------------------------------------------


def markdown(rows: list[Measured], checks: dict[str, Any], header: dict[str, str]) -> str:
    lines = [f"# Backend comparison — {header['device']}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    if checks:  # measured on a CPU only (ceiling_checks); empty elsewhere
        bw, peak = checks["calibrated_read_bandwidth"], checks["calibrated_gemm_flops"]
        lines += [
            "",
            f"Denominators (measured in this run): read bandwidth {human_bytes(bw)}/s, "
            f"{header['dtype']} GEMM {peak / 1e9:.0f} GFLOP/s.",
            "",
            "| ceiling check | figure | ratio to calibrated |",
            "| --- | --- | --- |",
        ]
        for name, v in checks["bandwidth_checks"].items():
            lines.append(f"| {name} | {human_bytes(v['bytes_per_s'])}/s | {v['ratio_to_calibrated']:.2f} |")
        (gemm_name, gemm_value), (_, ratio) = list(checks["gemm_check"].items())
        lines += [f"| {gemm_name} | {gemm_value / 1e9:.0f} GFLOP/s | {ratio:.2f} |"]
    lines += [
        "",
        "Columns: S-MBU against the read bandwidth calibrated at the start; S-MBU paired against a streaming "
        "read (stream_read) of the very weights the forward must read, timed interleaved with the scenario's "
        "runs (this machine's bandwidth depends on where a buffer's pages lie); S-MFU against the calibrated "
        "GEMM peak; roofline = max(bytes / calibrated bandwidth, FLOPs / GEMM peak); counting in situ = "
        "median time of one forward's counting where the profile runs it, right after the forward, and its "
        "share of the backend's median; small op after a run = the control: median time of adding 0 to 8 "
        "floats right after any timed run of the scenario, outside the timed regions (what any first op "
        "pays there); on/off = median with counting over median without, the last backend run both ways "
        "in the same shuffled interleaving (noise-bound when the forward is short). transformers:<impl> = "
        "transformers' own MoE block of the layer, holding the same weights (so the same routing, bytes and "
        "FLOPs), run by that experts implementation, in the same interleaving. rel. err = the output's "
        "relative error against the float64 reference, on decode rows.",
        "",
    ]
    lines += [
        "| model | phase | T | backend | median | p10–p90 | S-MBU | S-MBU paired | S-MFU | vs loop "
        "| roofline "
        "| × roofline | counting: in situ | small op after a run | counting: on/off | rel. err |",
        "| " + " | ".join(["---", "---", "---:", "---"] + ["---:"] * 12) + " |",
    ]
    for r in rows:
        speedup = "—" if r.speedup_vs_loop is None else f"{r.speedup_vs_loop:.2f}×"
        overhead = "" if r.counting_overhead is None else f"{100 * r.counting_overhead:+.1f}%"
        counting = (
            "—"
            if r.counting_cost_s is None
            else f"{r.counting_cost_s * 1e6:.1f} µs = {100 * r.counting_cost_s / r.median_s:.2f}%"
        )
        error = "" if r.rel_error is None else f"{r.rel_error:.1e}"
        lines.append(
            f"| {r.model} | {r.phase} | {r.tokens} | {r.backend} | {r.median_s * 1e3:.2f} ms "
            f"| {r.p10_s * 1e3:.2f}–{r.p90_s * 1e3:.2f} | {r.s_mbu:.2f} | {r.s_mbu_paired:.2f} "
            f"| {r.s_mfu:.2f} "
            f"| {speedup} "
            f"| {r.roofline_s * 1e3:.2f} ms | {r.median_s / r.roofline_s:.2f} "
            f"| {counting} | {r.small_op_after_run_s * 1e6:.1f} µs | {overhead} | {error} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, fewer scenarios (under 2 minutes)")
    parser.add_argument("--models", help="comma list of presets (default: 4 layers, or 2 with --quick)")
    parser.add_argument("--quant", help="weight formats side by side instead: comma list, or all")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    console = Console()
    device = torch.device(args.device)
    started = time.perf_counter()
    info = hardware.detect_device(device)
    formats = (
        () if args.quant is None else ALL_FORMATS if args.quant == "all" else tuple(args.quant.split(","))
    )
    dtypes = [args.dtype, *(["int8"] if "w8a8" in formats else [])]
    calibration = hardware.calibrate(device, dtypes, force=True)
    peaks = {
        d: hardware.resolve_peaks(
            info, d, calibration=calibration, peak_bandwidth=None, peak_flops=None, prefer_measured=True
        )
        for d in dtypes
    }
    checks = ceiling_checks(calibration, args.dtype) if device.type == "cpu" else {}
    default_models = FORMAT_MODELS if formats else QUICK_MODELS if args.quick else FULL_MODELS
    models = args.models.split(",") if args.models else default_models
    scenarios = FORMAT_SCENARIOS if formats else QUICK_SCENARIOS if args.quick else FULL_SCENARIOS
    reps = {"decode": 8, "prefill": 2} if args.quick else {"decode": 25, "prefill": 5}
    dtype = torch_dtype(args.dtype)
    rows: list[Any] = []
    for name in models:
        spec = load_preset(name).with_dtype(args.dtype).with_format("none")
        # backend_names(): loop (the baseline) first, the most specialised last (it gets the overhead pair)
        backends = tuple(
            n
            for n in backend_names()
            if get_backend(n).availability(device, dtype) is None
            and any(get_backend(n).supports(spec.with_format(f)) is None for f in formats or ("none",))
        )
        console.print(f"[bold]{name}[/bold] ({', '.join(backends)})")
        if formats:
            rows += compare_formats.compare_formats(
                spec, scenarios, formats, backends, device, info, peaks, reps, console
            )
        else:
            rows += compare_layer(spec, scenarios, backends, device, info, peaks[args.dtype], reps, console)
    date = dt.date.today().isoformat()
    given = sys.argv[1:] if argv is None else argv
    header = {
        "date": date,
        "device": info.name,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "dtype": args.dtype,
        "counting": extension_status(),
        "command": f"python benchmarks/compare.py {shlex.join(given)}".rstrip(),
        "wall time": f"{time.perf_counter() - started:.0f} s",
    }
    kind = "compare-formats" if formats else "compare"
    stem = results_file.stem(args.out, kind, info.name, "-quick" if args.quick else "")
    text = formats_markdown(rows, checks, header, peaks) if formats else markdown(rows, checks, header)
    write_atomic(stem.with_suffix(".md"), text)
    doc = {"header": header, "ceilings": checks, "rows": [asdict(r) for r in rows]}
    write_atomic(stem.with_suffix(".json"), json.dumps(doc, indent=2) + "\n")
    print(text)
    console.print(f"[dim]wrote {stem}.md and .json[/dim]")
    return 0


def formats_markdown(
    rows: list[compare_formats.FormatRow],
    checks: dict[str, Any],
    header: dict[str, str],
    peaks: dict[str, hardware.Peaks],
) -> str:
    lines = [f"# Weight formats — {header['device']}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    bandwidth = next(iter(peaks.values())).bandwidth_bytes_per_s
    gemms = "; ".join(
        f"{d} GEMM {p.flops_per_s / 1e9:.0f} G{'OP' if d == 'int8' else 'FLOP'}/s" for d, p in peaks.items()
    )
    lines += ["", f"Denominators (measured in this run): read bandwidth {bandwidth / 1e9:.1f} GB/s; {gemms}."]
    if checks:
        torch_sum = checks["bandwidth_checks"]["torch sum 1 GiB"]["bytes_per_s"]
        lines += [f"Cross-check: torch sum of 1 GiB {torch_sum / 1e9:.1f} GB/s."]
    lines += [
        "",
        " ".join(compare_formats.__doc__.split("\n\n")[0].split()),
        "",
        *compare_formats.markdown(rows),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
