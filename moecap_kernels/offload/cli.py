"""The command line's sequence modes: ``--trace-stats`` and ``--offload disk``."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from moecap_kernels.errors import UserError
from moecap_kernels.files import write_all_atomic
from moecap_kernels.offload.cache import POLICIES
from moecap_kernels.offload.run import run_offload, step_inputs
from moecap_kernels.offload.sequence import load_layers, parse_sequence_kind, synthetic_sequence
from moecap_kernels.offload.stats import sequence_stats
from moecap_kernels.report import to_json
from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import MoEWeights

DEFAULT_STEPS = 64


def sequence_layers(
    args: argparse.Namespace, spec: MoESpec, weights: Callable[[], MoEWeights]
) -> dict[int, np.ndarray]:
    """{layer: [S, T, k]}: a recorded sequence file, or one synthetic (or router-chosen) layer."""
    text = args.routing.strip()
    tokens = (args.batch or [1])[0]
    steps = args.steps or DEFAULT_STEPS
    if text.lower().startswith("trace:"):
        if args.steps is not None or args.batch is not None:
            raise UserError("a recorded sequence fixes its steps and tokens: drop --steps and --batch")
        return load_layers(Path(text[6:]).expanduser(), spec)
    if text.lower() == "router":  # the layer's own router on fresh random inputs each step
        empty = np.zeros((steps, tokens, spec.top_k), dtype=np.int64)
        layer = weights()
        picks = [
            ids.cpu().numpy()
            for _, ids, _ in step_inputs(spec, layer, empty, args.seed, layer.device, forced=False)
        ]
        return {0: np.stack(picks)}
    kind = parse_sequence_kind(text)
    if kind is None:
        raise UserError(
            f"routing {text!r} is no sequence; "
            "use router, uniform, zipf:A, dirichlet:A, sticky:P or trace:FILE.npz"
        )
    return {0: synthetic_sequence(kind[0], kind[1], steps, tokens, spec, args.seed)}


def capacities(args: argparse.Namespace, spec: MoESpec) -> list[int]:
    if args.cache_experts is None:
        e = spec.num_experts
        return sorted({max(e // 8, 1), max(e // 4, 1), max(e // 2, 1)})
    bad = [c for c in args.cache_experts if c > spec.num_experts]
    if bad:
        raise UserError(f"--cache-experts {bad[0]}: the layer has {spec.num_experts} experts")
    return list(args.cache_experts)


def policies(args: argparse.Namespace) -> list[str]:
    text = args.policy or "all"
    if text.strip() == "all":
        return list(POLICIES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if unknown or not names:
        raise UserError(
            f"unknown cache policy {unknown[0] if unknown else text!r}; use {', '.join(POLICIES)} or all"
        )
    return list(dict.fromkeys(names))


def stats_table(stats: dict[int, dict[str, Any]]) -> Table:
    table = Table(title="routing sequence: what it asks of an expert cache")
    for col in (
        "layer",
        "steps",
        "T",
        "distinct/step",
        "working set (W=1,4,16,64)",
        "90% of pairs",
        "entropy",
        "reuse distance median",
        "first uses",
    ):
        table.add_column(col, justify="right")
    for layer, s in stats.items():
        d = s["distinct_per_step"]
        table.add_row(
            str(layer),
            str(s["steps"]),
            str(s["tokens_per_step"]),
            f"{d['min']}–{d['max']} (mean {d['mean']:.1f})",
            " / ".join(f"{v:.1f}" for v in s["working_set"].values()),
            f"{s['experts_for_90pct']} of {s['experts_used']} used",
            f"{s['entropy_bits']:.2f} bits ({s['entropy_of_max']:.0%} of max)",
            "—" if s["reuse_distance"]["median"] is None else f"{s['reuse_distance']['median']:g}",
            str(s["reuse_distance"]["first_accesses"]),
        )
    return table


def offload_table(records: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col in (
        "C",
        "policy",
        "hit rate",
        "belady",
        "misses",
        "fetched",
        "fetch GB/s",
        "disk ceiling",
        "step",
        "resident step",
        "× resident",
        "S-MBU",
    ):
        table.add_column(col, justify="right")
    for r in records:
        table.add_row(
            str(r["cache_experts"]),
            r["policy"],
            f"{r['hit_rate']:.1%}",
            f"{r['oracle_hit_rate']:.1%}",
            str(r["misses"]),
            f"{r['fetched_bytes'] / 1e9:.2f} GB",
            "—"
            if r["fetch_bandwidth_bytes_per_s"] is None
            else f"{r['fetch_bandwidth_bytes_per_s'] / 1e9:.2f}",
            f"{r['tier_read_ceiling_bytes_per_s'] / 1e9:.2f} GB/s",
            f"{r['step_time_s'] * 1e3:.1f} ms",
            f"{r['resident_step_time_s'] * 1e3:.1f} ms",
            f"{r['step_time_s'] / r['resident_step_time_s']:.2f}×",
            f"{r['s_mbu']:.1%}",
        )
    return table


def plan_line(args: argparse.Namespace, spec: MoESpec, backend: str) -> str:
    """What ``--dry-run`` says of a sequence run, without making the layer or reading the sequence."""
    text = args.routing.strip()
    source = (
        text
        if text.lower().startswith("trace:")
        else (f"{text}, {args.steps or DEFAULT_STEPS} steps of T = {(args.batch or [1])[0]}")
    )
    line = f"routing sequence: {source}"
    if args.offload:
        caps = ", ".join(map(str, capacities(args, spec)))
        file_gb = spec.num_experts * spec.expert_weight_bytes / 1e9
        cache = "kept" if args.keep_page_cache else "dropped per step"
        line += (
            f"; offload to disk: C = {caps} of {spec.num_experts} experts, "
            f"policies {', '.join(policies(args))}, "
            f"{spec.expert_weight_bytes:,} B per expert ({file_gb:.2f} GB file), computed with {backend}, "
            f"page cache {cache}"
        )
    return line


def run_sequence_mode(
    args: argparse.Namespace,
    command: str,
    spec: MoESpec,
    device: torch.device,
    backend: str,
    weights: Callable[[], MoEWeights],
    bandwidth: Callable[[], float],
    console: Console,
) -> int:
    """``--trace-stats`` and/or ``--offload disk`` on the run's routing sequence."""
    if args.dry_run:
        console.print(plan_line(args, spec, backend), markup=False, highlight=False)
        return 0
    layers = sequence_layers(args, spec, weights)
    sections: dict[str, Any] = {}
    if args.trace_stats:
        stats = {i: sequence_stats(ids, spec.num_experts) for i, ids in layers.items()}
        console.print(stats_table(stats))
        sections["trace_stats"] = {str(i): s for i, s in stats.items()}
    if args.offload:
        if device.type != "cpu":
            raise UserError(
                "--offload disk runs on a CPU here (a pinned-host tier for GPUs is not built yet)"
            )
        layer = args.trace_layer if args.trace_layer is not None else min(layers)
        if layer not in layers:
            raise UserError(f"--trace-layer {layer}: the sequence holds layers {sorted(layers)}")
        folder = Path(args.offload_dir or tempfile.gettempdir()).expanduser()
        if not folder.is_dir():
            raise UserError(f"--offload-dir {folder}: not a folder")
        peak = bandwidth()
        records = run_offload(
            spec, weights(), layers[layer], capacities(args, spec), policies(args), backend, folder,
            drop_cache=not args.keep_page_cache, seed=args.seed, bandwidth=peak,
        )  # fmt: skip
        first = records[0]
        title = f"{spec.name}: experts on disk, {first['steps']} steps of T = {first['tokens_per_step']}"
        console.print(offload_table(records, title))
        console.print(
            "fetch and compute one after the other (no overlap); hit rates count expert accesses (each "
            "step's distinct experts); belady: the optimal hit rate for the same C; S-MBU over the "
            f"sequence: Σ compulsory bytes / Σ step time / {peak / 1e9:.1f} GB/s",
            style="dim",
            markup=False,
        )
        sections["offload"] = records
    if args.json:
        write_all_atomic({args.json: to_json([], command, **sections)})
    return 0
