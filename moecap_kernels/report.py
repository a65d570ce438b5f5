"""Presenting results: the JSON record of a row, the Rich table, atomic JSON and CSV files."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from moecap_kernels import __version__
from moecap_kernels.files import (
    write_all_atomic,
    write_atomic,  # noqa: F401  (re-exported: report.write_atomic)
)
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
        "weight_format": row.spec.weight_format,
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
        "accuracy": accuracy(row),
        "quant": quant_block(row.spec),
        "energy": None if row.energy is None else row.energy.to_dict(),
        "cost": None if row.cost is None else row.cost.to_dict(),
    }
    if row.energy is None:
        entry["energy_unavailable"] = row.energy_unavailable or "not measured"
    entry.update(row.extras)
    return entry


def sqnr_db(rel_error: float | None) -> float | None:
    """Signal-to-quantization-noise ratio of an output, 10·log10(‖y_ref‖² / ‖y − y_ref‖²) in dB."""
    if rel_error is None:
        return None
    return math.inf if rel_error == 0 else -20 * math.log10(rel_error)


def accuracy(row: RowResult) -> dict[str, Any]:
    """Both errors of a row: against the float64 layer as profiled (the kernel's own, ``rel_error``
    and ``kernel_rel_error``) and against the unquantized layer (what compression costs too)."""
    return {
        "rel_error": row.rel_error,
        "kernel_rel_error": row.rel_error,
        "quant_rel_error": row.quant_rel_error,
        "kernel_sqnr_db": sqnr_db(row.rel_error),
        "quant_sqnr_db": sqnr_db(row.quant_rel_error),
        "reference": "float64",
    }


def quant_block(spec: MoESpec) -> dict[str, Any]:
    """The weight format of a row and what one routed expert's bytes are made of."""
    fmt, parts = spec.fmt, spec.expert_bytes_by_part()
    return {
        "format": fmt.name,
        "weight_bits": fmt.weight_bits if fmt.quantized else 8 * spec.weight_bytes_per_param,
        "group_size": fmt.group_size or None,
        "block_rows": fmt.block_rows if fmt.quantized else None,
        "scale_dtype": fmt.scale_dtype or None,
        "compute_dtype": spec.compute_dtype,
        "code_bytes": parts["codes"],
        "scale_bytes": parts["scales"],
        "zero_point_bytes": parts["zero_points"],
        "bias_bytes": parts["biases"],
    }


def document(rows: Sequence[RowResult], command: str, **sections: Any) -> dict[str, Any]:
    """The JSON document (``sections``: further top-level entries, as ``ep_projection``); strict JSON:
    a non-finite number becomes null, named under ``nulls``."""
    return strict(
        {
            "schema_version": SCHEMA_VERSION,
            "tool": f"moecap_kernels {__version__}",
            "command": command,
            "results": [record(r) for r in rows],
            **sections,
        }
    )


def strict(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with every NaN or infinity replaced by null, each named under ``nulls``."""
    clean, nulls = _finite(doc, "")
    return {**clean, "nulls": nulls} if nulls else clean


def strict_json(doc: dict[str, Any]) -> str:
    """``doc`` as strict JSON text (``strict``), indented, with a final newline."""
    return json.dumps(strict(doc), indent=2, allow_nan=False) + "\n"


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


def to_json(rows: Sequence[RowResult], command: str, **sections: Any) -> str:
    return strict_json(document(rows, command, **sections))


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
    "weight_format",
    "accuracy.rel_error",
    "accuracy.quant_rel_error",
    "energy.joules_per_token",
    "cost.rental_usd_per_mtok",
    "cost.ownership_usd_per_mtok",
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
# When a row's experts are quantized: its weight format, and its error against the unquantized layer
# (rel. err is against the layer as profiled: the dequantized weights).
FORMAT_COLUMNS = ("format", "quant err")
# Instrumented kernels only: executed / useful expert FLOPs, issued / compulsory expert weight bytes.
KERNEL_COLUMNS = ("pad. waste", "load amp.")
# Where measured / priced: joules per token (energy counters), $ per million tokens (``cost``).
COST_COLUMNS = ("J/tok", "$/Mtok")


def _error(value: float | None) -> str:
    return "—" if value is None else f"{value:.1e}"


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
    format_columns = any(r.spec.fmt.quantized for r in rows)
    cost_columns = tuple(
        name for name, shown in zip(COST_COLUMNS, (_has_energy(rows), _has_cost(rows)), strict=True) if shown
    )
    names = COLUMNS[:2] + (FORMAT_COLUMNS[:1] if format_columns else ()) + COLUMNS[2:]
    names += (FORMAT_COLUMNS[1:] if format_columns else ()) + (KERNEL_COLUMNS if kernel_columns else ())
    eager_column = any("time_s_eager" in r.extras for r in rows)
    audit_column = any("audit" in r.extras for r in rows)
    names += (
        cost_columns + (("eager p50",) if eager_column else ()) + (("DRAM/counted",) if audit_column else ())
    )
    for name in names:
        left = name in ("backend", "bound", "format")
        table.add_column(name, justify="left" if left else "right", no_wrap=True)
    for r in rows:
        t, u = r.time, r.util
        kernel = r.extras.get("kernel")
        kernel_cells = (
            (f"{kernel['padding_waste']:.2f}×", f"{kernel['load_amplification']:.2f}×")
            if kernel
            else ("—", "—")
        )
        format_cell = (r.spec.weight_format,) if format_columns else ()
        quant_cell = (_error(r.quant_rel_error),) if format_columns else ()
        table.add_row(
            str(r.tokens),
            r.backend,
            *format_cell,
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
            _error(r.rel_error),
            *quant_cell,
            *(kernel_cells if kernel_columns else ()),
            *_cost_cells(r, cost_columns),
            *((_eager_cell(r),) if eager_column else ()),
            *((_audit_cell(r),) if audit_column else ()),
        )
    return table


def _audit_cell(row: RowResult) -> str:
    """DRAM bytes read under ncu ÷ the counted compulsory bytes, or why there is none."""
    audit = row.extras.get("audit")
    if audit is None:
        return "—"
    return f"{audit['read_over_counted']:.2f}×" if "read_over_counted" in audit else "n/a"


def _eager_cell(row: RowResult) -> str:
    eager = row.extras.get("time_s_eager")
    return "—" if eager is None else human_time(eager["median"])


def _has_energy(rows: Sequence[RowResult]) -> bool:
    return any(r.energy is not None for r in rows)


def _has_cost(rows: Sequence[RowResult]) -> bool:
    return any(r.cost is not None and r.cost.best_known is not None for r in rows)


def _cost_cells(row: RowResult, columns: Sequence[str]) -> list[str]:
    cells = []
    if "J/tok" in columns:
        cells.append("—" if row.energy is None else f"{row.energy.joules_per_token:.3g}")
    if "$/Mtok" in columns:
        usd = None if row.cost is None else row.cost.best_known
        cells.append("—" if usd is None else f"${usd:.3g}")
    return cells


def energy_note(rows: Sequence[RowResult]) -> str:
    """How the energy was measured, or why it was not."""
    measured = [r.energy for r in rows if r.energy is not None]
    if not measured:
        reasons = dict.fromkeys(r.energy_unavailable or "not measured" for r in rows)
        return "Energy: not measured (" + "; ".join(reasons) + "); no estimate is given in its place."
    e = measured[0]
    return (
        f"Energy: {e.source} ({e.scope}), read around a loop of the row's forwards back to back "
        f"(≥ 1 s, after the timed reps, caches not flushed); J/tok = joules ÷ (forwards × T)."
    )


def cost_note(rows: Sequence[RowResult]) -> str | None:
    """What the $/Mtok column is and every price behind it, or None when no row is priced."""
    costs = [r.cost for r in rows if r.cost is not None]
    if not costs:
        return None
    priced = [c for c in costs if c.best_known is not None]
    if not priced:  # say how to get a figure rather than an empty column
        return f"$/Mtok: not shown ({costs[0].prices.describe()})."
    c = priced[0]
    shown = "rental" if c.rental_usd_per_mtok is not None else "ownership (capital + measured energy)"
    return f"$/Mtok: {shown}, per million {c.per}. {c.prices.describe()}."


def checkpoint_line(spec: MoESpec, formats: Sequence[str] = ()) -> str:
    """One line: how the checkpoint stores its experts, and the weight formats profiled."""
    formats = tuple(formats) or (spec.weight_format,)
    shown = ", ".join(spec.weight_dtype if f == "none" else f for f in formats)
    native = spec.weight_format if spec.weight_format != "none" else None
    if native is None:
        note = " (no weight format here computes the checkpoint's own)"
    elif native not in formats:
        note = f" (not its own format, {native})"
    else:
        note = ""
    return f"the checkpoint stores its experts as {spec.checkpoint_format}; profiled as {shown}{note}"


def _trials(spread: float | None) -> str:
    return "" if spread is None else f"; trials within {spread:.1%}"


def timing_methods(rows: Sequence[RowResult]) -> str:
    """How the rows were timed; graph replays are kernel time, and the eager loop's is beside them."""
    graphed = [r for r in rows if "time_s_eager" in r.extras]
    methods = ", ".join(dict.fromkeys(r.time.method for r in rows))
    if not graphed:
        return methods
    others = {r.extras.get("cuda_graph") for r in rows if "time_s_eager" not in r.extras} - {None}
    why = f" (the others eager: {'; '.join(sorted(others))})" if others else ""
    return (
        f"{methods}: time p50 is the kernels' time for the {len(graphed)} graphed rows, "
        f"'eager p50' what an eager loop of launches takes{why}"
    )


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
    by_dtype = {r.peaks.dtype: r.peaks for r in rows}  # w8a8 rows divide by the int8 peak
    flops = "; ".join(
        f"{human_flops(q.flops_per_s)}/s {q.dtype} ({q.flops_source}{_trials(q.flops_spread)})"
        + ("" if len(by_dtype) == 1 else f" for the {q.dtype} rows")
        for q in by_dtype.values()
    )
    ridges = ", ".join(
        f"{q.ridge_point:.1f}" + (f" ({q.dtype})" if len(by_dtype) > 1 else "") for q in by_dtype.values()
    )
    return (
        f"S-MBU, MBU: ÷ {human_bytes(p.bandwidth_bytes_per_s)}/s ({p.bandwidth_source}"
        f"{_trials(p.bandwidth_spread)}).  "
        f"S-MFU, MFU: ÷ {flops}.  "
        f"Ridge point {ridges} FLOP/byte.  Timing: {timing_methods(rows)}, "
        f"median of {len(rows[0].time.samples_s)} reps; {cache}.  Counts: {rows[0].counter_impl}.  "
        "Dense MBU/MFU count every expert as read and computed: above 100% where sparsity saves work."
    )


def print_report(rows: Sequence[RowResult], console: Console) -> None:
    if not rows:
        console.print("no results")
        return
    console.print(results_table(rows))
    console.print(denominators_note(rows), style="dim", markup=False)
    for note in (energy_note(rows), cost_note(rows)):
        if note:
            console.print(note, style="dim", markup=False)
    from moecap_kernels.cap import SCALING, cap_points, cap_table  # cap reads this module's sqnr_db

    console.print(cap_table(cap_points(rows)))
    console.print(f"CAP axes: {SCALING}.", style="dim", markup=False)
    if rows[0].peaks.caveat:
        caveat = f"{rows[0].peaks.caveat}: S-MBU and S-MFU are against these figures"
        console.print(caveat, style="bold yellow", markup=False)
    for row in rows:
        if "ep" in row.extras:
            print_ep(row, console)


def report_and_write(
    rows: Sequence[RowResult],
    console: Console,
    command: str,
    json_path: str | None,
    csv_path: str | None,
    pictures: Mapping[str, bytes] | None = None,
) -> None:
    """Print the report, then write the JSON and CSV files asked for and ``pictures`` ({path: bytes}),
    together (atomically)."""
    print_report(rows, console)
    files: dict[str, str | bytes] = {json_path: to_json(rows, command)} if json_path else {}
    if csv_path:
        files[csv_path] = to_csv(rows)
    files.update(pictures or {})
    write_all_atomic(files)


def print_ep(row: RowResult, console: Console) -> None:
    """The ranks of an expert-parallel row: per-rank table, traffic matrix (N ≤ 16), summary."""
    from moecap_kernels.ep.report import matrix_table, ranks_table, summary_line

    ep = row.extras["ep"]
    console.print(ranks_table(f"{row.spec.name} {row.backend}, T = {ep['tokens_per_rank']} per rank", ep))
    if ep["ranks"] <= 16:
        console.print(matrix_table(ep["traffic_pairs"]))
    console.print(summary_line(ep), style="dim", markup=False)
