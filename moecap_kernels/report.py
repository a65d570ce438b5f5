"""Presenting results: the JSON record of a row, the Rich table, atomic JSON and CSV files."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from moecap_kernels import __version__
from moecap_kernels.files import write_atomic  # noqa: F401  (re-exported: report.write_atomic)
from moecap_kernels.runner import RowResult
from moecap_kernels.spec import MoESpec

SCHEMA_VERSION = 1


def record(row: RowResult) -> dict[str, Any]:
    """One entry of the JSON ``results`` list (schema documented in the README)."""
    counts, util, peaks = row.counts, row.util, row.peaks
    entry: dict[str, Any] = {
        "model": row.spec.name,
        "backend": row.backend,
        "device": row.device.name,
        "device_kind": row.device.kind,
        "dtype": row.spec.act_dtype,
        "phase": row.scenario.phase,
        "batch": row.scenario.batch,
        "seq_len": row.scenario.seq_len if row.scenario.phase == "prefill" else None,
        "tokens": row.tokens,
        "routing": row.routing,
        "weights": row.weights_source,
        "spec": row.spec.to_dict(),
        "counts": {
            "tokens_per_expert": list(counts.tokens_per_expert),
            "activated_experts": counts.activated_experts,
            "routed_pairs": counts.routed_pairs,
            "counter_impl": row.counter_impl,
        },
        "bytes": row.bytes.to_dict(),
        "flops": row.flops.to_dict(),
        "time_s": row.time.to_dict(),
        "tokens_per_s": row.tokens / row.time.median,
        "cache_flushed": row.cache_flushed,
        "peak": {
            "bandwidth_bytes_per_s": peaks.bandwidth_bytes_per_s,
            "flops_per_s": peaks.flops_per_s,
            "source": peaks.source,
            "bandwidth_source": peaks.bandwidth_source,
            "flops_source": peaks.flops_source,
            "bandwidth_spread": peaks.bandwidth_spread,
            "flops_spread": peaks.flops_spread,
            "caveat": peaks.caveat or None,
        },
        "s_mbu": util.s_mbu,
        "s_mfu": util.s_mfu,
        "mbu_dense": util.mbu_dense,
        "mfu_dense": util.mfu_dense,
        "arithmetic_intensity": util.arithmetic_intensity,
        "ridge_point": util.ridge_point,
        "bound": util.bound,
        "roofline_time_s": util.roofline_time_s,
        "load_imbalance": row.imbalance,
        "accuracy": {"rel_error": row.rel_error, "reference": "float64"},
    }
    entry.update(row.extras)
    return entry


def document(rows: Sequence[RowResult], command: str) -> dict[str, Any]:
    """The JSON document; strict JSON: a non-finite number becomes null, named under ``nulls``."""
    doc, nulls = _finite(
        {
            "schema_version": SCHEMA_VERSION,
            "tool": f"moecap_kernels {__version__}",
            "command": command,
            "results": [record(r) for r in rows],
        },
        "",
    )
    return {**doc, "nulls": nulls} if nulls else doc


def _finite(value: Any, path: str) -> tuple[Any, dict[str, str]]:
    """``value`` with every NaN or infinity replaced by None, and {dotted path: what it was}."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, {path: f"{value} (not a finite number)"}
    nulls: dict[str, str] = {}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out[key], found = _finite(item, f"{path}.{key}" if path else key)
            nulls.update(found)
        return out, nulls
    if isinstance(value, list):
        items = []
        for i, item in enumerate(value):
            clean, found = _finite(item, f"{path}[{i}]")
            items.append(clean)
            nulls.update(found)
        return items, nulls
    return value, nulls


# --- files ---------------------------------------------------------------------------------


def to_json(rows: Sequence[RowResult], command: str) -> str:
    return json.dumps(document(rows, command), indent=2, allow_nan=False) + "\n"


CSV_COLUMNS = (
    "model",
    "backend",
    "device",
    "dtype",
    "phase",
    "batch",
    "seq_len",
    "tokens",
    "routing",
    "time_s.median",
    "time_s.p10",
    "time_s.p90",
    "tokens_per_s",
    "counts.activated_experts",
    "counts.routed_pairs",
    "bytes.compulsory",
    "bytes.dense",
    "flops.useful",
    "flops.dense",
    "s_mbu",
    "s_mfu",
    "mbu_dense",
    "mfu_dense",
    "arithmetic_intensity",
    "bound",
    "load_imbalance",
    "accuracy.rel_error",
    "peak.bandwidth_bytes_per_s",
    "peak.flops_per_s",
    "peak.source",
)


def _lookup(entry: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        entry = entry.get(key) if isinstance(entry, dict) else None
    return entry


def to_csv(rows: Sequence[RowResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        entry = record(row)
        writer.writerow(["" if (v := _lookup(entry, c)) is None else v for c in CSV_COLUMNS])
    return buffer.getvalue()


# --- terminal ------------------------------------------------------------------------------


def _si(value: float, units: Sequence[str]) -> tuple[float, str]:
    """``value`` divided by 1000 until below 1000 (or out of ``units``), and the unit reached."""
    for unit in units[:-1]:
        if abs(value) < 1000:
            return value, unit
        value /= 1000
    return value, units[-1]


def human_bytes(n: float) -> str:
    value, unit = _si(n, ("B", "KB", "MB", "GB", "TB"))
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"


def human_flops(n: float) -> str:
    value, unit = _si(n, ("", "K", "M", "G", "T", "P"))
    return f"{value:.1f} {unit}FLOP"


def _time_scale(seconds: float) -> tuple[float, str]:
    """The factor and unit (s, ms or µs) in which ``seconds`` reads best."""
    return (1.0, "s") if seconds >= 1 else (1e3, "ms") if seconds >= 1e-3 else (1e6, "µs")


def human_time(seconds: float) -> str:
    scale, unit = _time_scale(seconds)
    return f"{seconds * scale:.{1 if unit == 'µs' else 2}f} {unit}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _span(low: float, high: float) -> str:
    scale, unit = _time_scale(high)
    return f"{low * scale:.3g}–{high * scale:.3g} {unit}"


COLUMNS = (
    "T", "backend", "time p50", "p10–p90", "tok/s", "experts", "bytes", "FLOPs", "S-MBU", "MBU",
    "S-MFU", "MFU", "AI", "bound", "imbal.", "rel. err",
)  # fmt: skip
# Instrumented kernels only: executed / useful expert FLOPs, issued / compulsory expert weight bytes.
KERNEL_COLUMNS = ("pad. waste", "load amp.")


def results_table(rows: Sequence[RowResult]) -> Table:
    """One row per (scenario, backend); the layer, dtype, device and routing go in the title."""
    first = rows[0]
    phases = ", ".join(dict.fromkeys(r.scenario.phase for r in rows))
    title = " · ".join(
        (first.spec.name, phases, first.spec.act_dtype, first.device.name, f"routing {first.routing}")
    )
    table = Table(
        title=title,
        title_style="bold",
        header_style="bold",
    )
    kernel_columns = any("kernel" in r.extras for r in rows)
    for name in COLUMNS + (KERNEL_COLUMNS if kernel_columns else ()):
        table.add_column(name, justify="left" if name in ("backend", "bound") else "right", no_wrap=True)
    for r in rows:
        t, u = r.time, r.util
        kernel = r.extras.get("kernel")
        kernel_cells = (
            (f"{kernel['padding_waste']:.2f}×", f"{kernel['load_amplification']:.2f}×")
            if kernel
            else ("—", "—")
        )
        table.add_row(
            str(r.tokens),
            r.backend,
            human_time(t.median),
            _span(t.p10, t.p90),
            f"{r.tokens / t.median:,.0f}",
            f"{r.counts.activated_experts}/{r.spec.num_experts}",
            human_bytes(r.bytes.compulsory),
            human_flops(r.flops.useful),
            _pct(u.s_mbu),
            _pct(u.mbu_dense),
            _pct(u.s_mfu),
            _pct(u.mfu_dense),
            f"{u.arithmetic_intensity:.1f}",
            u.bound,
            f"{r.imbalance:.2f}",
            "—" if r.rel_error is None else f"{r.rel_error:.1e}",
            *(kernel_cells if kernel_columns else ()),
        )
    return table


def checkpoint_line(spec: MoESpec) -> str:
    """One line when the checkpoint stores its experts otherwise than the dtype profiled."""
    return (
        f"the checkpoint stores its experts as {spec.checkpoint_format}; profiled in {spec.weight_dtype} "
        "(quantized experts are not implemented yet)"
    )


def _trials(spread: float | None) -> str:
    return "" if spread is None else f"; trials within {spread:.1%}"


def denominators_note(rows: Sequence[RowResult]) -> str:
    """What the ratios are ratios of: the peaks used, with their sources, and cache handling."""
    p = rows[0].peaks
    flushed = {r.cache_flushed for r in rows}
    cache = (
        "cache flushed between repetitions"
        if flushed == {True}
        else "working set larger than 4× the last-level cache: no flush"
        if flushed == {False}
        else "cache flushed between repetitions where the working set is below 4× the last-level cache"
    )
    return (
        f"S-MBU, MBU: ÷ {human_bytes(p.bandwidth_bytes_per_s)}/s ({p.bandwidth_source}"
        f"{_trials(p.bandwidth_spread)}).  "
        f"S-MFU, MFU: ÷ {human_flops(p.flops_per_s)}/s {p.dtype} ({p.flops_source}"
        f"{_trials(p.flops_spread)}).  "
        f"Ridge point {p.ridge_point:.1f} FLOP/byte.  Timing: {rows[0].time.method}, "
        f"median of {len(rows[0].time.samples_s)} reps; {cache}.  Counts: {rows[0].counter_impl}.  "
        "Dense MBU/MFU count every expert as read and computed: above 100% where sparsity saves work."
    )


def print_report(rows: Sequence[RowResult], console: Console) -> None:
    if not rows:
        console.print("no results")
        return
    console.print(results_table(rows))
    console.print(denominators_note(rows), style="dim", markup=False)
    if rows[0].peaks.caveat:
        caveat = f"{rows[0].peaks.caveat}: S-MBU and S-MFU are against these figures"
        console.print(caveat, style="bold yellow", markup=False)
