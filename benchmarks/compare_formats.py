"""Weight formats side by side (``python benchmarks/compare.py --quant FMT,…``): every (format,
backend) pair that runs here, on the same inputs and routing, interleaved per scenario in one
shuffled order, each beside a streaming read of its own compulsory bytes (the activated experts'
codes, scales and zero points, the shared experts', the router) timed in the same interleaving.

Per row: the time, S-MBU against the calibrated read bandwidth and against that paired read, S-MFU
against the compute dtype's calibrated peak (int8 for w8a8), the speed against the same backend on
unquantized experts and against the fastest unquantized row, and both accuracies (against the
float64 layer with the dequantized weights, and with the unquantized ones) on decode rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from rich.console import Console

from moecap_kernels import hardware
from moecap_kernels._ext import has_op
from moecap_kernels.quant.layer import in_format
from moecap_kernels.routing import RoutingChoice
from moecap_kernels.runner import BackendRun, ProfileRequest, Row, Scenario, needs_flush
from moecap_kernels.spec import MoESpec
from moecap_kernels.timing import CacheFlusher, time_interleaved
from moecap_kernels.weights import MoEWeights, random_weights

CHECKED_TOKENS = 64  # rows up to this many tokens are checked against both float64 references


@dataclass(frozen=True)
class FormatRow:
    model: str
    phase: str
    tokens: int
    weight_format: str
    backend: str
    median_s: float
    p10_s: float
    p90_s: float
    expert_bytes: int  # one routed expert in this format
    compulsory_bytes: int
    s_mbu: float
    s_mbu_paired: float  # compulsory bytes / time / the paired read of this format's own bytes
    s_mfu: float
    compute_dtype: str
    speedup_vs_none: float | None  # the same backend's unquantized median / this median
    speedup_vs_fastest_none: float | None  # the fastest unquantized median of the scenario / this median
    kernel_rel_error: float | None
    quant_rel_error: float | None


def compulsory_tensors(weights: MoEWeights, ids: torch.Tensor) -> list[torch.Tensor]:
    """The tensors one forward must read in the weights' format: the activated experts' (codes,
    scales, zero points when quantized), every shared expert's, the router."""
    q = weights.quantized
    pairs = (
        (weights.w_in, weights.w_out, weights.shared_w_in, weights.shared_w_out)
        if q is None
        else (q.w_in, q.w_out, q.shared_w_in, q.shared_w_out)
    )

    def parts(m) -> list[torch.Tensor]:
        return (
            [m] if isinstance(m, torch.Tensor) else [t for t in (m.codes, m.scales, m.zeros) if t is not None]
        )

    routed_in, routed_out, shared_in, shared_out = (parts(m) for m in pairs)
    tensors = [t[e] for e in torch.unique(ids).tolist() for t in (*routed_in, *routed_out)]
    tensors += [t[s] for s in range(shared_in[0].shape[0]) for t in (*shared_in, *shared_out)]
    return [*tensors, weights.router]


def compare_formats(
    spec: MoESpec,
    scenarios: tuple[Scenario, ...],
    formats: tuple[str, ...],
    backends: tuple[str, ...],
    device: torch.device,
    info: hardware.DeviceInfo,
    peaks: Mapping[str, hardware.Peaks],
    reps: dict[str, int],
    console: Console,
) -> list[FormatRow]:
    """Every format × every backend of ``backends`` that computes it, interleaved per scenario."""
    dense = random_weights(spec, device, seed=0)
    layers = {f: in_format(dense, spec.with_format(f)) for f in formats}  # quantized once
    read = torch.ops.moecap.stream_read if has_op("stream_read", device.type) else torch.sum
    rows: list[FormatRow] = []
    for scenario in scenarios:
        request = ProfileRequest(
            spec=spec, scenarios=(scenario,), backends=backends, routing=RoutingChoice("router"),
            device=device, warmup=1 if scenario.phase == "prefill" else 2, reps=reps[scenario.phase],
            check_accuracy=scenario.tokens <= CHECKED_TOKENS,
        )  # fmt: skip
        row = Row(request, dense, scenario, scenario.tokens)
        runs, probes = [], []
        for fmt, weights in layers.items():
            runs += [BackendRun(request.in_format(fmt), weights, row, b) for b in request.backends_for(fmt)]
            probe = compulsory_tensors(weights, row.ids)
            probes.append((fmt, probe, sum(t.numel() * t.element_size() for t in probe)))
        flush = needs_flush(spec.with_format("none"), row, info)
        flusher = CacheFlusher(info.llc_bytes, device) if flush else None
        timed = [*runs, *(lambda i, p=probe: [read(t) for t in p] for _, probe, _ in probes)]
        timings = time_interleaved(
            timed, device, warmup=request.warmup, reps=request.reps, between=flusher,
            after_warmup=[run.reset_counts for run in runs],
        )  # fmt: skip
        paired = {
            fmt: nbytes / t.median for (fmt, _, nbytes), t in zip(probes, timings[len(runs) :], strict=True)
        }
        results = [
            run.finish(scenario, timing, info, peaks[run.request.spec.compute_dtype], flush)
            for run, timing in zip(runs, timings[: len(runs)], strict=True)
        ]
        unquantized = {r.backend: r.time.median for r in results if r.spec.weight_format == "none"}
        for r in results:
            fmt = r.spec.weight_format
            vs_none = unquantized[r.backend] / r.time.median if r.backend in unquantized else None
            fastest = min(unquantized.values(), default=None)
            rows.append(
                FormatRow(
                    model=spec.name, phase=scenario.phase, tokens=r.tokens, weight_format=fmt,
                    backend=r.backend, median_s=r.time.median, p10_s=r.time.p10, p90_s=r.time.p90,
                    expert_bytes=r.spec.expert_weight_bytes, compulsory_bytes=r.bytes.compulsory,
                    s_mbu=r.util.s_mbu, s_mbu_paired=r.bytes.compulsory / r.time.median / paired[fmt],
                    s_mfu=r.util.s_mfu, compute_dtype=r.spec.compute_dtype,
                    speedup_vs_none=vs_none,
                    speedup_vs_fastest_none=None if fastest is None else fastest / r.time.median,
                    kernel_rel_error=r.rel_error, quant_rel_error=r.quant_rel_error,
                )
            )  # fmt: skip
        best = min(rows[-len(results) :], key=lambda m: m.median_s)
        console.print(
            f"  {spec.name} T={scenario.tokens}: fastest {best.backend} {best.weight_format} "
            f"{best.median_s * 1e3:.2f} ms (paired S-MBU {best.s_mbu_paired:.2f})"
        )
    return rows


def markdown(rows: list[FormatRow]) -> list[str]:
    """The table, one line per (scenario, format, backend)."""
    lines = [
        "| model | T | format | backend | bytes / expert | median | p10–p90 | S-MBU | S-MBU paired | S-MFU "
        "| vs none | vs fastest none | kernel rel. err | quant rel. err |",
        "| " + " | ".join(["---", "---:", "---", "---"] + ["---:"] * 10) + " |",
    ]

    def err(value: float | None) -> str:
        return "" if value is None else f"{value:.1e}"

    def ratio(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}×"

    for r in rows:
        mfu = f"{r.s_mfu:.3f}" + (f" ({r.compute_dtype})" if r.compute_dtype == "int8" else "")
        lines.append(
            f"| {r.model} | {r.tokens} | {r.weight_format} | {r.backend} | {r.expert_bytes / 1e6:.2f} MB "
            f"| {r.median_s * 1e3:.2f} ms | {r.p10_s * 1e3:.2f}–{r.p90_s * 1e3:.2f} | {r.s_mbu:.2f} "
            f"| {r.s_mbu_paired:.2f} | {mfu} | {ratio(r.speedup_vs_none)} "
            f"| {ratio(r.speedup_vs_fastest_none)} "
            f"| {err(r.kernel_rel_error)} | {err(r.quant_rel_error)} |"
        )
    return lines
