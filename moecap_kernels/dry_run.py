"""``--dry-run``: what a profile would do, printed before anything is allocated or timed.

The resolved layer (every MoESpec field and where it came from), the scenarios, the backends (and
why others are left out), the peaks that would divide, and the memory each row would need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.table import Table

from moecap_kernels.hardware import DeviceInfo, Peaks
from moecap_kernels.report import checkpoint_line, human_bytes, human_flops
from moecap_kernels.runner import ProfileRequest, fits, layer_weight_bytes, memory_needed

GiB = 2**30


def layer_table(request: ProfileRequest, origins: Mapping[str, str]) -> Table:
    spec = request.spec
    table = Table(title=f"layer {spec.name}", title_style="bold", header_style="bold")
    for column in ("field", "value", "from"):
        table.add_column(column, overflow="fold")
    for field in dataclasses.fields(spec):
        table.add_row(field.name, str(getattr(spec, field.name)), origins.get(field.name, "default"))
    table.add_row("[dim]params per expert[/dim]", f"{spec.params_per_expert:,}", "[dim]derived[/dim]")
    table.add_row("[dim]weights in all[/dim]", human_bytes(spec.total_weight_bytes), "[dim]derived[/dim]")
    return table


def peaks_line(peaks: Mapping[str, Peaks], pending: str) -> str:
    """The denominators that would divide ({compute dtype: peaks}), or what would measure them."""
    if not peaks:
        return f"peaks: {pending}"
    first = next(iter(peaks.values()))
    flops = "; ".join(f"{human_flops(p.flops_per_s)}/s {p.dtype} ({p.flops_source})" for p in peaks.values())
    return f"peaks: {human_bytes(first.bandwidth_bytes_per_s)}/s ({first.bandwidth_source}); {flops}" + (
        f"; {first.caveat}" if first.caveat else ""
    )


def memory_lines(request: ProfileRequest, info: DeviceInfo) -> list[str]:
    lines = []
    for scenario in request.scenarios:
        need, extra = memory_needed(
            request.spec, scenario.tokens, request.check_accuracy, request.backends, request.weight_formats
        )
        verdict = "fits" if fits(need, info) else "would be refused: it does not fit"
        copies = f", backends' own copies {extra / GiB:.1f} GiB" if extra else ""
        lines.append(
            f"memory at T = {scenario.tokens}: about {need / GiB:.1f} GiB "
            f"(weights {layer_weight_bytes(request.spec, request.weight_formats) / GiB:.1f} GiB{copies}) of "
            f"{info.memory_available_bytes / GiB:.1f} GiB available on {info.name}: {verdict}"
        )
    return lines


def print_plan(
    console: Console,
    request: ProfileRequest,
    origins: Mapping[str, str],
    skipped: Mapping[str, str],
    info: DeviceInfo,
    peaks: Mapping[str, Peaks],
    pending: str,
    outputs: Sequence[str],
) -> None:
    """Print the plan of ``request``; allocates nothing on the device."""
    console.print("dry run: nothing allocated, nothing timed", style="bold")
    console.print(layer_table(request, origins))
    tokens = ", ".join(str(s.tokens) for s in request.scenarios)
    spec = request.spec
    lines = [
        f"scenarios: {request.scenarios[0].phase}, T = {tokens}; routing {request.routing.describe()}; "
        f"weights {request.weights_source}",
        "bytes per routed expert (codes + scales + zero points + biases): "
        + "; ".join(f"{f} {spec.with_format(f).expert_weight_bytes:,} B" for f in request.weight_formats),
        "backends: "
        + "; ".join(f"{f}: {', '.join(request.backends_for(f))}" for f in request.weight_formats)
        + "".join(f"; not {name}: {why}" for name, why in skipped.items()),
        f"timing: {request.warmup} warm-up and {request.reps} timed forwards per row on {request.device}; "
        + ("accuracy against a float64 reference" if request.check_accuracy else "no accuracy check"),
        peaks_line(peaks, pending),
        *memory_lines(request, info),
    ]
    if request.spec.checkpoint_format:
        lines.append(checkpoint_line(request.spec, request.weight_formats))
    if outputs:
        lines.append(f"would write {', '.join(outputs)}")
    for line in lines:
        console.print(line, markup=False, highlight=False)
