"""Pictures of one run, as PNG or SVG bytes (matplotlib, the optional ``plot`` extra; no pyplot, no
display needed):

- ``radar``: the CAP radar, one panel per scenario, one polygon per row (``cap.cap_points``);
- ``roofline``: every row at (arithmetic intensity, attained FLOP/s) under the roofs of the peaks it
  was divided by: solid where measured on this machine, dashed where from a datasheet or given.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from moecap_kernels.errors import UserError

if TYPE_CHECKING:  # torch and matplotlib load when a picture is drawn: the CLI checks paths without them
    from matplotlib.figure import Figure

    from moecap_kernels.runner import RowResult

FORMATS = (".png", ".svg")


def check_plot_path(text: str, flag: str) -> Path:
    """``text`` when it ends in .png or .svg and matplotlib is importable, else one UserError line."""
    import importlib.util

    path = Path(text)
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"{flag} {text}: the file must end in .png or .svg")
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError(f"{flag} needs matplotlib: pip install 'moecap_kernels[plot]'")
    return path


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def render(fig: Figure, path: str | Path) -> bytes:
    """The figure as PNG or SVG bytes, by ``path``'s suffix (written by the caller, atomically); an
    SVG keeps its text as text (searchable, selectable)."""
    import matplotlib

    buffer = io.BytesIO()
    kind = Path(path).suffix.lower().lstrip(".")
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(
            buffer, format=kind, dpi=130, metadata={"Software": None} if kind == "png" else {"Date": None}
        )
    return buffer.getvalue()


def radar(rows: Sequence[RowResult]) -> Figure:
    """The CAP radar: one polar panel per scenario, one polygon per row, axes scaled as ``cap`` says."""
    from moecap_kernels.cap import AXES, SCALING, cap_points

    points = cap_points(rows)
    groups = list(dict.fromkeys(p.group for p in points))
    columns = min(len(groups), 3)
    lines = math.ceil(len(groups) / columns)
    fig = _figure(4.2 * columns, 4.0 * lines + 0.9)
    angles = [2 * math.pi * i / len(AXES) for i in range(len(AXES))]
    colours = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(p.label for p in points))}
    for index, group in enumerate(groups):
        ax = fig.add_subplot(lines, columns, index + 1, projection="polar")
        ax.set_theta_offset(math.pi / 2)
        ax.set_theta_direction(-1)
        ax.set_xticks(angles)
        ax.set_xticklabels(AXES, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_yticks([0.25, 0.5, 0.75, 1.0])
        ax.set_yticklabels(["", "0.5", "", "1"], fontsize=6)
        ax.set_title(group, fontsize=10, pad=14)
        for p in (p for p in points if p.group == group):
            values = [p.scores[a] or 0.0 for a in AXES]  # an unknown axis (no price) sits at the centre
            ax.plot([*angles, angles[0]], [*values, values[0]], color=colours[p.label], lw=1.5, label=p.label)
            ax.fill([*angles, angles[0]], [*values, values[0]], color=colours[p.label], alpha=0.08)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=8)
    first = rows[0]
    missing = [a for a in AXES if all(p.scores[a] is None for p in points)]
    note = f"; {', '.join(missing)}: not known (drawn at 0)" if missing else ""
    fig.suptitle(
        f"CAP radar: {first.spec.name}, {first.spec.act_dtype}, {first.device.name}\n{SCALING}{note}",
        fontsize=7,
        wrap=True,
    )
    return fig


def _roofs(rows: Sequence[RowResult]) -> list[tuple[str, float, float, bool]]:
    """(label, bytes/s, FLOP/s, measured) of each distinct pair of peaks the rows divide by, and on a
    GPU with a datasheet entry, the datasheet's beside measured ones."""
    from moecap_kernels.hardware import datasheet_entry

    roofs: dict[tuple[float, float], tuple[str, float, float, bool]] = {}
    for row in rows:
        p = row.peaks
        measured = not p.bandwidth_source.startswith(("datasheet", "user")) and not p.flops_source.startswith(
            ("datasheet", "user")
        )
        label = f"{'measured' if measured else p.source} ({p.dtype})"
        roofs.setdefault(
            (p.bandwidth_bytes_per_s, p.flops_per_s),
            (label, p.bandwidth_bytes_per_s, p.flops_per_s, measured),
        )
        entry = datasheet_entry(row.device.name) if row.device.kind == "cuda" else None
        if entry is not None and measured and entry.peak_flops(p.dtype) is not None:
            bw, fl = entry.bandwidth_bytes_per_s, entry.peak_flops(p.dtype)
            roofs.setdefault((bw, fl), (f"datasheet: {entry.name} ({p.dtype})", bw, fl, False))
    return list(roofs.values())


def roofline(rows: Sequence[RowResult]) -> Figure:
    """Every row on the roofline of its peaks: x = useful FLOPs per compulsory byte, y = useful FLOP/s."""
    fig = _figure(7.5, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    xs = [r.util.arithmetic_intensity for r in rows]
    ys = [r.flops.useful / r.time.median for r in rows]
    roofs = _roofs(rows)
    ridges = [fl / bw for _, bw, fl, _ in roofs]
    low = min([*xs, *ridges]) / 4
    high = max([*xs, *ridges]) * 4
    for i, (label, bw, fl, measured) in enumerate(roofs):
        ridge = fl / bw
        grid = [low, ridge, high]
        ax.plot(grid, [min(bw * x, fl) for x in grid], ls="-" if measured else "--", color=f"C{7 + i % 3}",
                lw=1.6, label=f"roof: {label}, {bw / 1e9:,.1f} GB/s, {fl / 1e9:,.0f} GFLOP/s")  # fmt: skip
    backends = list(dict.fromkeys(r.backend for r in rows))
    markers = "osD^vP*Xh"
    for row, x, y in zip(rows, xs, ys, strict=True):
        marker = markers[backends.index(row.backend) % len(markers)]
        ax.scatter([x], [y], marker=marker, color=f"C{backends.index(row.backend) % 7}", s=28, zorder=3)
        fmt = f" {row.spec.weight_format}" if row.spec.fmt.quantized else ""
        ax.annotate(f"{row.backend}{fmt} T={row.tokens}", (x, y), textcoords="offset points",
                    xytext=(4, 3), fontsize=6)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, high)
    ax.set_xlabel("arithmetic intensity (useful FLOPs per compulsory byte)")
    ax.set_ylabel("attained useful FLOP/s")
    first = rows[0]
    ax.set_title(
        f"roofline: {first.spec.name}, {first.spec.act_dtype}, {first.device.name}\n"
        "solid: measured ceilings; dashed: datasheet or given",
        fontsize=8,
    )
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=6, loc="lower right")
    return fig
