"""The expert-parallel part of the report: placement, per-rank table, traffic matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from moecap_kernels.ep.placement import Placement


def placement_line(placement: Placement) -> str:
    held = [len(h) for h in placement.experts_of_rank]
    spread = f"{min(held)}–{max(held)}" if min(held) != max(held) else str(held[0])
    copies = placement.redundant_copies
    extra = f", {copies} redundant cop{'y' if copies == 1 else 'ies'}" if copies else ""
    return f"expert parallel: {placement.ranks} ranks, {spread} experts per rank ({placement.source}{extra})"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def ranks_table(title: str, ep: dict[str, Any]) -> Table:
    """One row per rank: what it received, its experts, its phases, its experts' S-MBU."""
    table = Table(title=title)
    for col in (
        "rank",
        "experts",
        "recv pairs",
        "activated",
        "router",
        "dispatch",
        "experts t",
        "combine",
        "S-MBU exp",
        "a2a ceil",
    ):
        table.add_column(col, justify="right")
    for r in ep["per_rank"]:
        e = r["experts"]
        t = r["time_s"]
        table.add_row(
            str(r["rank"]),
            f"{e[0]}…{e[-1]} ({len(e)})" if len(e) > 3 else ",".join(map(str, e)),
            str(r["received_pairs"]),
            str(r["activated_experts"]),
            *(_ms(t[p]) for p in ("router", "dispatch", "experts", "combine")),
            f"{r['s_mbu_experts']:.1%}",
            _ms(r["alltoall_ceiling_s"]),
        )
    return table


def matrix_table(pairs: Sequence[Sequence[int]]) -> Table:
    """The N×N traffic matrix of routed pairs (row: source rank, column: expert's rank)."""
    table = Table(title="routed pairs, source rank → expert's rank")
    table.add_column("from \\ to", justify="right")
    for c in range(len(pairs)):
        table.add_column(str(c), justify="right")
    for r, row in enumerate(pairs):
        table.add_row(str(r), *map(str, row))
    return table


def summary_line(ep: dict[str, Any]) -> str:
    t = ep["time_s"]
    return (
        f"balancedness {ep['balancedness']:.3f} (mean/max pairs per rank); communication "
        f"{ep['comm_share']:.1%} of the ranks' time (waiting included); dispatch at "
        f"{ep['dispatch_vs_alltoall_ceiling']:.2f}× the speed of a bare all-to-all of its sizes; "
        f"phases (median over ranks): router {_ms(t['router'])}, dispatch {_ms(t['dispatch'])}, "
        f"experts {_ms(t['experts'])}, combine {_ms(t['combine'])}"
        + ("; ranks share one device" if ep["devices_shared"] else "")
    )


def print_projection(records: Sequence[dict[str, Any]], model: str, console: Any) -> None:
    """The PROJECTED table: per (N, link, T), the link's dispatch/combine beside the measured experts."""
    table = Table(title=f"{model}: expert parallelism PROJECTED onto links (not measured)")
    for col in (
        "ranks", "T/rank", "link", "balanced", "max recv pairs", "off-rank bytes",
        "dispatch*", "combine*", "experts (measured)", "comm share*",
    ):  # fmt: skip
        table.add_column(col, justify="right")
    for r in records:
        t = r["expert_time_s"]
        table.add_row(
            str(r["ranks"]),
            str(r["tokens_per_rank"]),
            r["link"]["key"],
            f"{r['balancedness']:.3f}",
            str(max(r["received_pairs"])),
            f"{r['dispatch_off_rank_bytes_max'] / 1e6:.2f} MB",
            _us(r["dispatch_s_max"]),
            _us(r["combine_s_max"]),
            f"{_us(t['median'])} (rank {r['busiest_rank']})",
            f"{r['comm_share']:.1%}",
        )
    console.print(table)
    if records:
        t = records[0]["expert_time_s"]
        console.print(
            "* projected: dispatch = 2·α·peers + max(off-rank bytes sent, received) / B; combine = "
            "α·peers + the same bytes / B; slowest rank; one link for all traffic (no NVLink/NIC "
            "hierarchy); α assumed unless --link-latency. Experts: the busiest rank's local experts "
            f"(random weights, {t['weight_format']}) on the rows it receives, measured on "
            f"{t['measured_on']} with {t['backend']}, median of {t['reps']}.",
            style="dim",
            markup=False,
        )
        for link in {r["link"]["key"]: r["link"] for r in records}.values():
            console.print(
                f"{link['key']}: {link['bytes_per_s'] / 1e9:g} GB/s each way ({link['source']}); "
                f"α = {link['latency_s'] * 1e6:g} µs ({link['latency_source']})",
                style="dim",
                markup=False,
            )


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} µs"
