"""The CAP picture of one run: each row's Cost, Accuracy and Performance on axes where outward is
better, and a compact terminal form of it (the radar itself is drawn by ``plots``).

The scaling of each axis (stated under the picture, ``SCALING``):

- **Cost** = the cheapest $/Mtok among the rows of the same T ÷ the row's (1 = cheapest); rental
  where priced, else ownership; no axis value without a price;
- **Accuracy** = SQNR of the output against the float64 layer with the unquantized weights, in dB,
  ÷ 60 dB, clipped to [0, 1] (a bfloat16 layer scores about 0.8; 20 dB, a 10% error, scores 0.33);
- **Throughput** = tokens/s ÷ the fastest row's of the same T;
- **Utilization** = S-MBU for decode rows, S-MFU for prefill rows (already ratios to the peaks),
  clipped to [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.table import Table

from moecap_kernels.report import sqnr_db
from moecap_kernels.runner import RowResult

AXES = ("Cost", "Accuracy", "Throughput", "Utilization")
ACCURACY_FULL_SCALE_DB = 60.0
SCALING = (
    "Cost: cheapest $/Mtok at the same T ÷ the row's; Accuracy: SQNR vs the float64 unquantized layer "
    f"÷ {ACCURACY_FULL_SCALE_DB:g} dB; Throughput: tokens/s ÷ the fastest at the same T; Utilization: "
    "S-MBU (decode) or S-MFU (prefill); each clipped to [0, 1], outward is better"
)
BAR_WIDTH = 8


@dataclass(frozen=True)
class CapPoint:
    """One row of a run on the CAP axes: ``scores`` in [0, 1] (None: not known), ``raw`` the figures."""

    label: str  # backend, and its weight format when quantized
    group: str  # the scenario: "decode T=8"
    scores: dict[str, float | None]
    raw: dict[str, float | None]


def _clip(value: float) -> float:
    return min(max(value, 0.0), 1.0)


def row_label(row: RowResult) -> str:
    return row.backend if not row.spec.fmt.quantized else f"{row.backend} {row.spec.weight_format}"


def group_label(row: RowResult) -> str:
    return f"{row.scenario.phase} T={row.tokens}"


def cap_points(rows: Sequence[RowResult]) -> list[CapPoint]:
    """Every row's CAP scores, relative axes scaled within its scenario (same phase and T)."""
    groups: dict[str, list[RowResult]] = {}
    for row in rows:
        groups.setdefault(group_label(row), []).append(row)
    points = []
    for group, members in groups.items():
        speeds = [r.tokens / r.time.median for r in members]
        costs = [r.cost.best_known if r.cost is not None else None for r in members]
        known_costs = [c for c in costs if c is not None]
        cheapest = min(known_costs) if known_costs else None
        for row, speed, cost in zip(members, speeds, costs, strict=True):
            sqnr = sqnr_db(row.quant_rel_error)
            util = row.util.s_mbu if row.scenario.phase == "decode" else row.util.s_mfu
            scores = {
                "Cost": None if cost is None or cheapest is None else _clip(cheapest / cost),
                "Accuracy": None if sqnr is None else _clip(sqnr / ACCURACY_FULL_SCALE_DB),
                "Throughput": speed / max(speeds),
                "Utilization": _clip(util),
            }
            raw = {"Cost": cost, "Accuracy": sqnr, "Throughput": speed, "Utilization": util}
            points.append(CapPoint(row_label(row), group, scores, raw))
    return points


def bar(score: float | None, width: int = BAR_WIDTH) -> str:
    """``score`` in [0, 1] as a bar of eighth-blocks, ``width`` cells long; "n/a" when unknown."""
    if score is None:
        return "n/a".ljust(width)
    eighths = round(score * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")).ljust(width, "·")


def _raw(axis: str, value: float | None) -> str:
    if value is None:
        return "—"
    if axis == "Cost":
        return f"${value:.3g}"
    if axis == "Accuracy":
        return "exact" if value == float("inf") else f"{value:.0f} dB"
    if axis == "Throughput":
        return f"{value:,.0f}/s"
    return f"{value:.0%}"


def cap_table(points: Sequence[CapPoint]) -> Table:
    """The radar in one line per row: a bar per axis, the figure beside it."""
    table = Table(title="CAP: Cost · Accuracy · Performance (outward = better)", header_style="bold")
    table.add_column("scenario")
    table.add_column("row")
    for axis in AXES:
        table.add_column(axis, no_wrap=True)
    for p in points:
        table.add_row(p.group, p.label, *(f"{bar(p.scores[a])} {_raw(a, p.raw[a])}" for a in AXES))
    return table
