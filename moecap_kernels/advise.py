"""``python -m moecap_kernels.advise --model NAME --scenario decode:1,8,64 [--quant …]``: which hardware
for this model? PROJECTED.

For every datasheet device (and this machine, with its measured peaks): how many devices hold the
whole model in each weight format, and the projected time of one MoE layer on them from the exact
counts of the scenario's routing (``projection``), the model's tokens/s through its MoE layers, and
the rental $/Mtok where the prices table has a price. Ranked per T; every assumption printed under
the tables and written to the JSON. Exit codes as the profile's: 0, 2 on bad input, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from moecap_kernels import limits
from moecap_kernels.errors import UserError
from moecap_kernels.exits import Interrupt, run_cli
from moecap_kernels.files import check_writable
from moecap_kernels.profile import _console, _Parser, format_names, integer, integer_list, text_arg

if TYPE_CHECKING:
    from rich.console import Console

    from moecap_kernels.projection import Projection, Target
    from moecap_kernels.spec import ModelFacts, MoESpec

DEFAULT_SCENARIO = "decode:1,8,64"
DEFAULT_USABLE_MEMORY = 0.9  # of a device's memory, for the weights (--usable-memory)
DEFAULT_FORMATS = ("none", "fp8-block", "int4-g128")
PHASES = ("decode", "prefill")


@dataclass(frozen=True)
class AdviseScenario:
    phase: str
    tokens: int  # T per forward: the decode batch, or prefill tokens


def parse_scenario(text: str) -> list[AdviseScenario]:
    """``decode:1,8,64`` or ``prefill:512,4096`` (tokens per forward)."""
    phase, _, sizes = text.strip().partition(":")
    if phase not in PHASES or not sizes:
        raise UserError(f"--scenario {text!r}: expected decode:T[,T…] or prefill:T[,T…]")
    try:
        tokens = integer_list(1, limits.MAX_TOKENS)(sizes)
    except argparse.ArgumentTypeError as exc:
        raise UserError(f"--scenario {text!r}: {exc}") from None
    return [AdviseScenario(phase, t) for t in dict.fromkeys(tokens)]


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction above 0, at most 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m moecap_kernels.advise",
        description="PROJECTED: which devices hold a model, how many, and how fast and at what price "
        "its MoE layers would run, from the exact counts of a routing.",
    )
    p.add_argument("--model", type=text_arg, required=True, help="a shipped preset (profile --list-models)")
    p.add_argument(
        "--scenario",
        action="append",
        help=f"decode:T[,T…] or prefill:T[,T…], repeatable (default {DEFAULT_SCENARIO})",
    )
    p.add_argument(
        "--quant",
        type=text_arg,
        help=f"weight formats, comma list (default {','.join(DEFAULT_FORMATS)}; none = the model's dtype)",
    )
    p.add_argument("--devices", type=text_arg, help="datasheet keys, comma list (default: all of them)")
    p.add_argument("--no-local", action="store_true", help="leave this machine out (no calibration)")
    p.add_argument("--routing", type=text_arg, default="router", help="as the profile's --routing")
    p.add_argument("--seed", type=integer(0, limits.MAX_SEED), default=0)
    p.add_argument("--efficiency-bandwidth", type=fraction, help="e_bw for every device (default: per kind)")
    p.add_argument("--efficiency-flops", type=fraction, help="e_flops for every device (default: per kind)")
    p.add_argument(
        "--usable-memory",
        type=fraction,
        default=DEFAULT_USABLE_MEMORY,
        help=f"fraction of a device's memory for weights ({DEFAULT_USABLE_MEMORY})",
    )
    p.add_argument("--instance", type=text_arg, help="price this machine as a table instance (--list-prices)")
    p.add_argument("--top", type=integer(1, 10_000), default=12, help="ranked rows shown per T (default 12)")
    p.add_argument("--json", help="write every projection as JSON (atomically)")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.scenarios = [s for text in (args.scenario or [DEFAULT_SCENARIO]) for s in parse_scenario(text)]
    args.formats = format_names(args.quant) if args.quant else None
    if args.json is not None:
        check_writable(args.json, "--json")
    return args


# --- the targets -------------------------------------------------------------------------------


@cache
def efficiency_table() -> dict[str, Any]:
    text = (resources.files("moecap_kernels.hardware") / "efficiency.json").read_text(encoding="utf-8")
    return json.loads(text)["kinds"]


def efficiency(kind: str, args: argparse.Namespace) -> tuple[float, float, str]:
    """(e_bw, e_flops, where they came from) for a device kind; the flags replace the table's."""
    entry = efficiency_table()[kind]
    e_bw = args.efficiency_bandwidth or entry["bandwidth"]
    e_flops = args.efficiency_flops or entry["flops"]
    given = [f for f, v in (("--efficiency-bandwidth", args.efficiency_bandwidth),
                            ("--efficiency-flops", args.efficiency_flops)) if v]  # fmt: skip
    how = "measured by this project" if entry["measured"] else "assumed"
    source = f"{how} on {kind}" + (f"; {', '.join(given)} given" if given else "")
    return e_bw, e_flops, source


def datasheet_targets(args: argparse.Namespace, compute_dtype: str) -> list[Target]:
    from moecap_kernels.cost import resolve_prices
    from moecap_kernels.hardware import datasheet_entries
    from moecap_kernels.projection import Target

    entries = datasheet_entries()
    if args.devices:
        wanted = [k.strip() for k in args.devices.split(",") if k.strip()]
        known = {e.key for e in entries}
        unknown = [k for k in wanted if k not in known]
        if unknown:
            raise UserError(f"--devices: unknown {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        entries = tuple(e for e in entries if e.key in wanted)
    e_bw, e_flops, source = efficiency("cuda", args)
    targets = []
    for e in entries:
        prices = resolve_prices(e.key)
        targets.append(
            Target(
                name=e.name,
                memory_bytes=e.memory_gb * 2**30,
                bandwidth_bytes_per_s=e.bandwidth_bytes_per_s,
                flops_per_s=e.peak_flops(compute_dtype),
                efficiency_bandwidth=e_bw,
                efficiency_flops=e_flops,
                efficiency_source=source,
                peaks_source=f"datasheet: {e.source}",
                usd_per_hour=prices.hourly_usd,
                price_source=prices.hourly_source,
            )
        )
    return targets


def local_target(args: argparse.Namespace, compute_dtype: str, console: Console) -> Target:
    """This machine, with its measured peaks (the calibration cache, or a calibration now)."""
    import torch

    from moecap_kernels import hardware
    from moecap_kernels.cost import resolve_prices
    from moecap_kernels.projection import Target

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = hardware.detect_device(device)
    say = lambda line: console.print(line, style="dim", markup=False)  # noqa: E731
    calibration = hardware.calibrate(device, [compute_dtype], announce=say)
    peaks = hardware.resolve_peaks(
        info,
        compute_dtype,
        calibration=calibration,
        peak_bandwidth=None,
        peak_flops=None,
        prefer_measured=True,
    )
    e_bw, e_flops, source = efficiency(info.kind, args)
    prices = resolve_prices(None, instance=args.instance)
    return Target(
        name=f"this machine ({info.name}, {info.cores} {'cores' if info.kind == 'cpu' else 'SMs'})",
        memory_bytes=info.memory_total_bytes,
        bandwidth_bytes_per_s=peaks.bandwidth_bytes_per_s,
        flops_per_s=peaks.flops_per_s,
        efficiency_bandwidth=e_bw,
        efficiency_flops=e_flops,
        efficiency_source=source,
        peaks_source=peaks.source,
        usd_per_hour=prices.hourly_usd,
        price_source=prices.hourly_source,
        measured_here=True,
    )


# --- the run -------------------------------------------------------------------------------------


def routed_counts(spec: MoESpec, scenario: AdviseScenario, routing: str, seed: int) -> list[int]:
    """Exact routed pairs per expert of the scenario's T tokens (the router on random weights of the
    layer's shape, or a synthetic/trace routing, as ``profile`` routes)."""
    import torch

    from moecap_kernels.ep.project import global_routing
    from moecap_kernels.routing import check_routing, parse_routing
    from moecap_kernels.runner import ProfileRequest

    choice = parse_routing(routing)
    check_routing(choice, spec)
    request = ProfileRequest(spec, (), (), choice, torch.device("cpu"), seed)
    ids = global_routing(request, scenario.tokens)
    return torch.bincount(ids.reshape(-1), minlength=spec.num_experts).tolist()


def formats_for(spec: MoESpec, wanted: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(the weight formats to project, notes on those left out because the layer's shape refuses them)."""
    chosen, notes = [], []
    for name in wanted or (*DEFAULT_FORMATS, spec.weight_format):
        if name in chosen:
            continue
        try:
            spec.with_format(name)
        except UserError as exc:
            if wanted:
                raise
            notes.append(f"{name} left out: {exc}")
            continue
        chosen.append(name)
    return chosen, notes


def format_label(spec: MoESpec, name: str) -> str:
    return spec.weight_dtype if name == "none" else name


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    with Interrupt.deferred():
        import torch  # noqa: F401  (imported while Ctrl-C is held back)

        from moecap_kernels.projection import project
        from moecap_kernels.spec import load_model_facts, load_preset
    console = _console()
    spec = load_preset(args.model)
    facts = load_model_facts(args.model)
    formats, notes = formats_for(spec, args.formats)
    counts = {s: routed_counts(spec, s, args.routing, args.seed) for s in args.scenarios}  # format-blind
    targets_of: dict[str, list[Target]] = {}  # by compute dtype (w8a8 divides by int8 peaks)
    projections: list[Projection] = []
    for name in formats:
        fmt_spec = spec.with_format(name)
        dtype = fmt_spec.compute_dtype
        if dtype not in targets_of:
            targets_of[dtype] = datasheet_targets(args, dtype)
            if not args.no_local:
                targets_of[dtype].append(local_target(args, dtype, console))
        for scenario in args.scenarios:
            Interrupt.check()
            for target in targets_of[dtype]:
                projections.append(project(fmt_spec, facts, counts[scenario], target, args.usable_memory))
    command = "python -m moecap_kernels.advise " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    lines = assumptions(args, spec, facts, projections) + notes
    print_advice(console, spec, facts, formats, args, projections, lines)
    if args.json:
        from moecap_kernels.files import write_atomic
        from moecap_kernels.report import strict_json

        doc = {
            "schema_version": 1,
            "tool": "moecap_kernels advise",
            "command": command,
            "projected": True,
            "model": spec.name,
            "model_facts": vars(facts),
            "routing": args.routing,
            "assumptions": lines,
            "projections": [p.to_dict() for p in projections],
        }
        write_atomic(args.json, strict_json(doc))
    return 0


def assumptions(
    args: argparse.Namespace, spec: MoESpec, facts: ModelFacts, projections: Sequence[Projection]
) -> list[str]:
    """Every assumption behind the tables, one line each."""
    effs = dict.fromkeys(
        (p.target.efficiency_source, p.target.efficiency_bandwidth, p.target.efficiency_flops)
        for p in projections
    )
    prices = dict.fromkeys(p.target.price_source for p in projections if p.target.usd_per_hour is not None)
    lines = [
        "PROJECTED, not measured (but for the routing counts, and this machine's peaks): "
        "layer time = max(bytes ÷ (peak bandwidth · e_bw), FLOPs ÷ (peak FLOP/s · e_flops)) "
        "of the busiest device",
        f"model: {facts.params / 1e9:,.1f} B parameters, {facts.moe_layers} MoE layers of {facts.layers} "
        f"({facts.source}); weights = experts in the format + every other parameter in {spec.weight_dtype}",
        f"fit: weights only, {args.usable_memory:.0%} of each device's memory usable "
        "(KV cache and activations not counted beyond the rest)",
        "on n devices: experts split contiguously (E/n each, all T tokens' pairs to their owner); "
        "the busiest device's routed bytes and FLOPs exact, the rest of the layer divided by n; "
        "no communication counted (profile --project-ep projects it)",
        "tokens/s = T ÷ (MoE layers × layer time): MoE layers only, attention and embeddings not counted",
        f"routing: {args.routing} (seed {args.seed}); a random router is not a trained one",
        *(f"efficiency e_bw = {bw:g}, e_flops = {fl:g}: {src}" for src, bw, fl in effs),
        "$/Mtok = devices × $/device-hour ÷ (tokens/s · 3600) · 1e6, rental (on-demand list prices):",
        *(f"  {src}" for src in prices),
    ]
    return lines


def _fits_table(spec: MoESpec, formats: Sequence[str], projections: Sequence[Projection]):
    from rich.table import Table

    table = Table(
        title=f"{spec.name}: devices needed to hold the weights (PROJECTED fit)", header_style="bold"
    )
    table.add_column("device")
    for name in formats:
        table.add_column(format_label(spec, name), justify="right")
    seen: dict[str, dict[str, Projection]] = {}
    for p in projections:
        seen.setdefault(p.target.name, {}).setdefault(p.weight_format, p)
    for device, by_format in seen.items():
        cells = []
        for name in formats:
            p = by_format.get(name)
            cells.append("—" if p is None else f"{p.devices} × ({p.model_bytes / p.devices / 1e9:,.0f} GB)")
        table.add_row(device, *cells)
    return table


def _ranked(projections: Sequence[Projection]) -> list[Projection]:
    """Priced first, cheapest first; then the rest, fastest first; no projection (no peak) last."""

    def key(p: Projection) -> tuple:
        if p.tokens_per_s is None:
            return (2, 0.0)
        if p.usd_per_mtok is None:
            return (1, -p.tokens_per_s)
        return (0, p.usd_per_mtok)

    return sorted(projections, key=key)


def print_advice(
    console: Console,
    spec: MoESpec,
    facts: ModelFacts,
    formats: Sequence[str],
    args: argparse.Namespace,
    projections: Sequence[Projection],
    lines: Sequence[str],
) -> None:
    from rich.table import Table

    from moecap_kernels.report import human_time

    console.print(_fits_table(spec, formats, projections))
    for scenario in args.scenarios:
        rows = [p for p in projections if p.tokens == scenario.tokens]
        table = Table(
            title=f"{spec.name}, {scenario.phase} T = {scenario.tokens}: PROJECTED, ranked by $/Mtok "
            f"(then tokens/s); the first {args.top} of {len(rows)}, and this machine",
            header_style="bold",
        )
        for col in ("#", "device", "format", "devices", "layer time", "bound", "tokens/s", "$/Mtok"):
            table.add_column(col, justify="left" if col in ("device", "format", "bound") else "right")
        ranked = _ranked(rows)
        shown = [p for i, p in enumerate(ranked) if i < args.top or p.target.measured_here]
        for p in shown:
            i = ranked.index(p) + 1
            table.add_row(
                str(i),
                p.target.name + (" [measured peaks]" if p.target.measured_here else ""),
                format_label(spec, p.weight_format),
                str(p.devices),
                "—" if p.layer_time_s is None else human_time(p.layer_time_s),
                p.bound,
                "—" if p.tokens_per_s is None else f"{p.tokens_per_s:,.0f}",
                "—" if p.usd_per_mtok is None else f"${p.usd_per_mtok:,.3g}",
            )
        console.print(table)
    for line in lines:
        console.print(line, style="dim", markup=False, highlight=False, soft_wrap=True)  # one line each


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda: run(parse_args(argv), argv))


if __name__ == "__main__":
    raise SystemExit(main())
